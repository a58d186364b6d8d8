"""Imports follow the reading order: a module uses only modules taught before it.

Parsed with `ast`, so function-level imports count too and nothing is executed. Modules that are
not in ORDER (launch scripts such as train_zero3, helpers such as exercises) sit above the stack:
they may import anything, and no module of ORDER may import them; place a module in ORDER to
make it importable from the stack.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import selfllm_utils

PACKAGE = "selfllm_utils"
PACKAGE_DIR = Path(selfllm_utils.__file__).parent
ORDER = ["registry", "quiet", "data", "smoke", "formatting", "cache", "models", "records", "training",
         "checkpoints", "memory", "inference", "metrics", "evaluation", "distributed", "webdemo",
         "deploy", "cli"]
PRESENT = sorted(p.stem for p in PACKAGE_DIR.glob("*.py") if p.stem != "__init__")
LISTED = [m for m in ORDER if m in PRESENT]


def package_imports(path: Path) -> set[str]:
    """Names of the package's modules that a source file imports (anywhere in the file)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == PACKAGE and len(parts) > 1:
                    found.add(parts[1])
        elif isinstance(node, ast.ImportFrom):
            relative = node.level == 1
            parts = (node.module or "").split(".") if node.module else []
            if relative and parts:  # from .registry import X
                found.add(parts[0])
            elif relative:  # from . import registry, smoke
                found.update(alias.name for alias in node.names)
            elif parts and parts[0] == PACKAGE:
                if len(parts) > 1:  # from selfllm_utils.registry import X
                    found.add(parts[1])
                else:  # from selfllm_utils import registry
                    found.update(alias.name for alias in node.names)
    return found - {path.stem}


def test_parser_sees_every_import_form(tmp_path: Path) -> None:
    source = tmp_path / "mod.py"
    source.write_text(
        "import os\nfrom . import a, b\nfrom .c import X\nimport selfllm_utils.d\n"
        "from selfllm_utils import e\nfrom selfllm_utils.f import Y\nfrom __future__ import annotations\n"
        "def g():\n    from . import h\n    from .. import outside\n", encoding="utf-8")
    assert package_imports(source) == {"a", "b", "c", "d", "e", "f", "h"}


def test_core_modules_are_listed() -> None:
    assert {"registry", "data", "smoke", "formatting", "models", "training", "inference"} <= set(LISTED)


@pytest.mark.parametrize("module", LISTED)
def test_imports_only_earlier_modules(module: str) -> None:
    allowed = set(ORDER[:ORDER.index(module)])
    imported = package_imports(PACKAGE_DIR / f"{module}.py")
    unlisted = imported - set(ORDER)
    assert not unlisted, f"{module} imports {sorted(unlisted)}, which ORDER does not place"
    later = imported - allowed
    assert not later, f"{module} imports {sorted(later)}, which come after it in the reading order"


def test_registry_is_the_bottom() -> None:
    assert package_imports(PACKAGE_DIR / "registry.py") == set()


@pytest.mark.parametrize("module", [m for m in PRESENT if m not in ORDER])
def test_unlisted_modules_import_only_package_modules(module: str) -> None:
    imported = package_imports(PACKAGE_DIR / f"{module}.py")
    assert imported <= set(PRESENT), f"{module} imports missing modules {sorted(imported - set(PRESENT))}"
