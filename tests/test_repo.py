"""Repository hygiene: CI runs what the README says, notebooks are committed clean, no private data."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from selfllm_utils import registry

ROOT = registry.repo_root()
README = ROOT / "README.md"
CI_RUN = ROOT / ".ci" / "run"
NOTEBOOKS = ROOT / "notebooks"
TEST_COMMAND_PREFIX = "pip install torch==2.13.0"
PRIVATE_DATA = "huanhuan.json"  # the public Chat-甄嬛 file: found via SELFLLM_HUANHUAN, never committed
NOTEBOOK_FILES = sorted(NOTEBOOKS.glob("*.ipynb"))


def _code_cells(path: Path) -> list[dict]:
    return [c for c in json.loads(path.read_text(encoding="utf-8"))["cells"] if c["cell_type"] == "code"]


def _source(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def test_ci_runs_the_readme_test_command() -> None:
    commands = [line.strip() for line in README.read_text(encoding="utf-8").splitlines()
                if line.strip().startswith(TEST_COMMAND_PREFIX)]
    assert len(commands) == 1, f"README.md should hold one line starting with {TEST_COMMAND_PREFIX!r}"
    ci_lines = [line.strip() for line in CI_RUN.read_text(encoding="utf-8").splitlines()]
    assert commands[0] in ci_lines, ".ci/run no longer runs the README's test command word for word"
    assert os.access(CI_RUN, os.X_OK), ".ci/run is not executable"


@pytest.mark.parametrize("notebook", NOTEBOOK_FILES, ids=[p.name for p in NOTEBOOK_FILES])
def test_notebook_committed_without_outputs(notebook: Path) -> None:
    dirty = [i for i, cell in enumerate(_code_cells(notebook))
             if cell.get("outputs") or cell.get("execution_count") is not None]
    assert not dirty, f"{notebook.name}: code cells {dirty} have outputs or execution counts"


@pytest.mark.parametrize("notebook", NOTEBOOK_FILES, ids=[p.name for p in NOTEBOOK_FILES])
def test_notebook_asks_registry_for_smoke_mode(notebook: Path) -> None:
    """The first code cell decides smoke mode through the one reader of SELFLLM_SMOKE."""
    cells = _code_cells(notebook)
    assert cells and "registry.smoke_mode()" in _source(cells[0]), \
        f"{notebook.name}: the first code cell should call registry.smoke_mode()"
    readers = [i for i, c in enumerate(cells) if "environ" in _source(c) and "SELFLLM_SMOKE" in _source(c)]
    assert not readers, f"{notebook.name}: cells {readers} read SELFLLM_SMOKE themselves"


def test_private_data_not_tracked() -> None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.splitlines()
    assert not [p for p in tracked if Path(p).name == PRIVATE_DATA]


@pytest.mark.parametrize("key", list(registry.TUTORIALS))
def test_registry_notebook_exists(key: str) -> None:
    """Every tutorial's notebook is there, and it is that tutorial's: it loads `registry.get(key)`."""
    path = NOTEBOOKS / registry.get(key).notebook
    assert path.is_file(), f"registry names notebooks/{path.name}, which does not exist"
    code = "\n".join(_source(c) for c in _code_cells(path))
    assert f'registry.get("{key}")' in code, f"{path.name} does not load the {key} tutorial"


def test_every_notebook_belongs_to_a_tutorial_or_is_numbered() -> None:
    """Notebook names follow NN-<model>-<method>.ipynb (ASCII)."""
    for path in NOTEBOOK_FILES:
        assert path.name.isascii() and path.name[:2].isdigit() and path.name[2] == "-", path.name


def test_notebooks_do_not_read_the_workplace_shared_folder():
    """Learners have no ../shared: notebooks take data from the package or from find_huanhuan()."""
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        nb = json.loads(path.read_text(encoding="utf-8"))
        code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
        assert '"shared"' not in code and "../shared" not in code, path.name


def _calls(code: str, name: str) -> list[str]:
    """The text of each call `name(...)` in `code`, up to its closing bracket."""
    calls, start = [], code.find(name + "(")
    while start >= 0:
        depth, i = 0, start + len(name)
        for i in range(start + len(name), len(code)):
            depth += {"(": 1, ")": -1}.get(code[i], 0)
            if depth == 0:
                break
        calls.append(code[start:i + 1])
        start = code.find(name + "(", i)
    return calls


@pytest.mark.parametrize("notebook", NOTEBOOK_FILES, ids=[p.name for p in NOTEBOOK_FILES])
def test_notebooks_load_models_without_hub_kernels(notebook: Path) -> None:
    """A model a notebook loads itself passes use_kernels=False, as models.load_model does: with
    transformers 5.25 and `kernels` installed, loading fetches kernels from the Hub and fails offline."""
    code = "\n".join(_source(c) for c in _code_cells(notebook))
    loads = _calls(code, "AutoModelForCausalLM.from_pretrained")
    assert all("use_kernels=False" in call for call in loads), f"{notebook.name}: {loads}"


def test_ci_pins_every_lower_bound() -> None:
    """.ci/run's pin script turns each `>=` bound of pyproject into `==` (torch excepted)."""
    import re
    import sys
    import tomllib

    script = re.search(r"<<'PINS'\n(.*?)\nPINS\n", CI_RUN.read_text(encoding="utf-8"), re.S)
    assert script, ".ci/run has no PINS block"
    out = subprocess.run([sys.executable, "-c", script[1]], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.split("\n")
    pins = dict(line.split(";")[0].split("==") for line in out if line)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    bounds = dict(r.split(";")[0].strip().split(">=") for r in project["dependencies"])
    del bounds["torch"]
    assert bounds and {k: pins.get(k) for k in bounds} == bounds
    assert pins["bitsandbytes"] and pins["deepspeed"] and pins["gguf"]


LEARNER_COMMAND_PREFIX = 'pip install -e ".[gpu,smoke,serve]"'


@pytest.mark.parametrize(("uid", "as_root"), [("0", True), ("1000", False)])
def test_readme_learner_command_starts_jupyterlab_as_root_too(uid: str, as_root: bool) -> None:
    """JupyterLab refuses root without --allow-root (AutoDL logs you in as root); others get none."""
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    commands = [line.strip() for line in README.read_text(encoding="utf-8").splitlines()
                if line.strip().startswith(LEARNER_COMMAND_PREFIX)]
    assert len(commands) == 1, f"README.md should hold one line starting with {LEARNER_COMMAND_PREFIX!r}"
    launch = commands[0][commands[0].index("jupyter lab"):]
    # the same line, with `id` answering as the given user and `jupyter` printing what it was given
    script = f'id() {{ echo {uid}; }}; jupyter() {{ echo "$@"; }}; {launch}'
    argv = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout.split()
    assert argv[:2] == ["lab", "notebooks"]
    assert ("--allow-root" in argv) is as_root


def test_run_all_leaves_the_web_demo_running_and_nbval_starts_none() -> None:
    """Notebook 03 used to start the demo and stop it in the next cell: "Run All" hid it at once.

    The start and stop cells are NBVAL_SKIP (CI leaves no server behind); the stop cell, run as
    "Run All" runs it, leaves the server alone until the learner flips its switch.
    """
    cells = _code_cells(NOTEBOOKS / registry.get("qwen2").notebook)
    starts = [_source(c) for c in cells if "webdemo.serve(" in _source(c)]
    stops = [_source(c) for c in cells if ".terminate()" in _source(c)]
    assert starts and stops
    assert all(source.startswith("# NBVAL_SKIP") for source in starts + stops)

    class Server:
        terminated = False

        def terminate(self) -> None:
            self.terminated = True

        def wait(self, timeout: float | None = None) -> int:
            return 0

    for source in stops:
        server = Server()
        exec(compile(source, "webdemo-stop", "exec"), {"server": server, "print": lambda *a: None})
        assert not server.terminated, "Run All would stop the demo the learner just started"
