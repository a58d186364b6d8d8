"""Notebook 03 on a learner's own data: the course's dataset/bakery_messages.jsonl (OpenAI messages,
a system prompt, multi-turn records, one broken record), entered through the notebook's one marked
cell ("your-data"), the way a learner would. nbval runs the notebook on the course's data; this
runs it a second time, so nothing in it may depend on the course's own records.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from selfllm_utils import registry

NOTEBOOK = registry.repo_root() / "notebooks" / registry.get("qwen2").notebook
OWN_DATA = '''# ✏️ a learner's own data (tests/test_own_data.py)
DATA = registry.repo_root() / "dataset" / "bakery_messages.jsonl"
HELDOUT = None  # no held-out file: the notebook splits some records off
NAME = "小麦"
QUESTION = "你好，请问你是谁？"
ORDINARY_QUESTION = "面包可以冷冻吗？"
OUT = Path({out!r})
'''


def course_notebook() -> dict:
    """Notebook 03 as nbval runs it: the cells that only a learner runs by hand (a server that runs
    until stopped: NBVAL_SKIP) are left out."""
    nb = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    nb["cells"] = [c for c in nb["cells"]
                   if not (c["cell_type"] == "code" and "NBVAL_SKIP" in "".join(c["source"]))]
    return nb


def own_data_notebook(out: Path) -> dict:
    """`course_notebook` with its marked cell replaced by the bakery's values, as a learner would."""
    nb = course_notebook()
    cells = {c.get("id"): c for c in nb["cells"]}
    assert "DATA = " in "".join(cells["your-data"]["source"])  # the one cell a learner edits
    cells["your-data"]["source"] = "from pathlib import Path\n" + OWN_DATA.format(out=str(out))
    return nb


@pytest.mark.skipif(not registry.smoke_mode(), reason="runs the smoke stand-in; set SELFLLM_SMOKE=1")
@pytest.mark.skipif(os.environ.get("SELFLLM_SKIP_NOTEBOOKS") == "1",
                    reason="the lower-bounds run tests the package, not the notebooks (.ci/run)")
def test_notebook_03_runs_on_a_learners_own_data(tmp_path: Path) -> None:
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.reads(json.dumps(own_data_notebook(tmp_path / "bakery")), as_version=4)
    client = NotebookClient(nb, timeout=1800, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    try:
        client.execute(env={**os.environ, "SELFLLM_SMOKE": "1"})
    except CellExecutionError as err:
        pytest.fail(str(err)[-4000:])
    texts = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "1 skipped" in texts and "(records 10)" in texts  # the broken record, named by its line
    assert "split off your data" in texts  # no held-out file: said so
    assert "too few held-out questions to judge" in texts  # 2 + 2 questions: shares said, not asserted
