"""benchmarks/notebook_seeds.py's pure parts: the notebook edits that set the seed and the output
folder, and the table. Running the notebook is the benchmark's job, not this file's."""

from __future__ import annotations

import runpy
from pathlib import Path
from types import SimpleNamespace

import pytest

from selfllm_utils import registry

PATH = registry.repo_root() / "benchmarks" / "notebook_seeds.py"


@pytest.fixture(scope="module")
def bench() -> SimpleNamespace:
    return SimpleNamespace(**runpy.run_path(str(PATH)))  # the script's functions, without running main


def _code(nb: dict) -> str:
    return "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")


def test_replace_line_replaces_exactly_one_line(bench) -> None:
    nb = {"cells": [{"cell_type": "markdown", "source": "x = 1\n"},
                    {"cell_type": "code", "source": ["a = 1\n", "x = 1\n", "b = 2"]}]}
    bench.replace_line(nb, "x = ", "x = 2")
    assert nb["cells"][1]["source"] == "a = 1\nx = 2\nb = 2"
    assert nb["cells"][0]["source"] == "x = 1\n"  # markdown is not code
    with pytest.raises(ValueError, match="0 code lines"):
        bench.replace_line(nb, "y = ", "y = 2")
    nb["cells"].append({"cell_type": "code", "source": "x = 3\n"})
    with pytest.raises(ValueError, match="2 code lines"):
        bench.replace_line(nb, "x = ", "x = 4")


@pytest.mark.parametrize("data", ["course", "bakery"])
def test_each_variant_trains_with_the_seed_it_names_and_writes_where_told(bench, data: str, tmp_path: Path) -> None:
    nb = bench.build(data, 7, "proof", tmp_path / "run")
    code = _code(nb)
    assert "seed=7)" in code and code.count("registry.smoke_config(T)") == 1
    assert f"OUT = Path({str(tmp_path / 'run')!r})" in code
    ids = [c.get("id") for c in nb["cells"]]
    assert ids[-2:] == ["deploy-proof", "notebook-seeds-report"]  # up to the proof, then the report
    assert "NBVAL_SKIP" not in code  # the learner-only cells are left out, as nbval does
    assert ("bakery_messages.jsonl" in code) == (data == "bakery")
    assert bench.build(data, 7, "eval", tmp_path)["cells"][-2]["id"] == "eval-03-after"


def test_the_report_is_read_back_and_summarized(bench) -> None:
    after = {"stop_share": 1.0, "identity_share": 0.5, "ordinary_share": 1.0}
    cells = [{"id": "a", "outputs": [{"output_type": "error", "ename": "AssertionError", "evalue": "x"}]},
             {"id": "r", "outputs": [{"output_type": "stream", "text": "noise\n" + bench.MARK
                                      + '{"seed": 1, "eval_after": {"stop_share": 1.0, "identity_share": 0.5, '
                                      '"ordinary_share": 1.0}, "agreement": {"merged": 0.75}}\n'}]}]
    report, errors = bench.read_report(cells)
    assert report["eval_after"] == after and errors == [{"cell": "a", "error": "AssertionError: x"}]
    rows = [{"data": "bakery", "seed": s, "report": {"eval_after": {**after, "identity_share": v}},
             "errors": []} for s, v in ((1, 0.5), (2, 1.0), (3, 1.0))]
    table = bench.summary(rows)
    assert "after.identity_share" in table and "min 0.500  median 1.000" in table
    assert "before.stop_share" not in table  # not measured: not in the table
