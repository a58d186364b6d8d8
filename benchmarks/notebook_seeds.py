"""Notebook 03's smoke-mode thresholds, measured over training seeds: one notebook run per (data, seed).

    SELFLLM_SMOKE=1 python benchmarks/notebook_seeds.py [--seeds 42 0 1] [--data course bakery]
        [--upto eval|proof] [--out runs.jsonl]
    python benchmarks/notebook_seeds.py --summarize runs.jsonl

The notebook's asserts after `eval_after` (identity, stop, ordinary shares) and in its deployment
proof (agreement of the merged folder and the f16 server with the trained model) were each set from
one run; this runs the notebook as nbval does (NBVAL_SKIP cells left out), with `cfg.seed` replaced,
on the course's data and on a learner's (tests/test_own_data.py's bakery variant), up to and
including the evaluation cell (`--upto eval`) or the proof cell (`--upto proof`), and reads the
shares back from the kernel. Errors do not stop a run (a seed that fails an assert is what we want
to see): the cells that raised are listed in its line. One JSON line per run on stdout (and appended
to --out), then a table of the min and median of each number per dataset.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from selfllm_utils import registry

ROOT = registry.repo_root()
UPTO = {"eval": "eval-03-after", "proof": "deploy-proof"}  # the last cell each mode runs
MARK = "NOTEBOOK_SEEDS "  # the report cell's line starts with it
REPORT = '''import json as _json
_out = {"seed": cfg.seed, "steps": getattr(globals().get("result"), "global_step", None)}
for _name in ("eval_before", "eval_after"):
    _r = globals().get(_name)
    _out[_name] = None if _r is None else {k: getattr(_r, k) for k in (
        "prompts", "stop_share", "identity_share", "ordinary_share", "mean_new_tokens", "answers")}
if "proof" in globals():
    _out["agreement"] = {form: proof.agreement(form) for form in deploy.FORMS[1:]}
print(%r + _json.dumps(_out, ensure_ascii=False))
''' % MARK
NUMBERS = ("before.stop_share", "after.stop_share", "before.identity_share", "after.identity_share",
           "before.ordinary_share", "after.ordinary_share", "merged", "gguf-f16 server", "gguf-quantized")


def _own_data():
    """tests/test_own_data.py, the one place the bakery variant of the notebook is built."""
    spec = importlib.util.spec_from_file_location("test_own_data", ROOT / "tests" / "test_own_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def replace_line(nb: dict, prefix: str, line: str) -> dict:
    """`nb` with the one code line that starts with `prefix` replaced by `line`. Anything but
    exactly one such line is an error: an edit that silently misses would measure the default."""
    hits = [(c, i) for c in nb["cells"] if c["cell_type"] == "code"
            for i, text in enumerate(_lines(c)) if text.startswith(prefix)]
    if len(hits) != 1:
        raise ValueError(f"{len(hits)} code lines start with {prefix!r}, expected one")
    cell, i = hits[0]
    lines = _lines(cell)
    lines[i] = line + ("\n" if lines[i].endswith("\n") else "")
    cell["source"] = "".join(lines)
    return nb


def _lines(cell: dict) -> list[str]:
    source = cell["source"]
    return ("".join(source) if isinstance(source, list) else source).splitlines(keepends=True)


def with_seed(nb: dict, seed: int) -> dict:
    """The notebook with its training seed (`cfg.seed`: LoRA's initial A, the data order) set."""
    return replace_line(nb, "cfg = registry.smoke_config(T)",
                        f"cfg = dataclasses.replace(registry.smoke_config(T) if SMOKE else T.config, seed={seed})")


def upto(nb: dict, cell_id: str) -> dict:
    """The notebook's cells up to and including `cell_id`, then the cell that reports the numbers."""
    ids = [c.get("id") for c in nb["cells"]]
    if cell_id not in ids:
        raise ValueError(f"no cell {cell_id!r} in the notebook")
    nb["cells"] = nb["cells"][: ids.index(cell_id) + 1] + [
        {"cell_type": "code", "id": "notebook-seeds-report", "metadata": {}, "outputs": [],
         "execution_count": None, "source": REPORT}]
    return nb


def build(data: str, seed: int, last: str, out: Path) -> dict:
    """The notebook to run for one (data, seed), writing under `out`."""
    own = _own_data()
    if data == "bakery":
        nb = own.own_data_notebook(out)
    elif data == "course":
        nb = replace_line(own.course_notebook(), "OUT = ", f"from pathlib import Path; OUT = Path({str(out)!r})")
    else:
        raise ValueError(f"unknown data {data!r}: course or bakery")
    return upto(with_seed(nb, seed), UPTO[last])


def read_report(cells) -> tuple[dict | None, list[dict]]:
    """(the report cell's numbers, the cells that raised) from an executed notebook's cells."""
    found, errors = None, []
    for cell in cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                errors.append({"cell": cell.get("id"), "error": f"{output['ename']}: {output['evalue']}"[:300]})
            for line in output.get("text", "").splitlines():
                if line.startswith(MARK):
                    found = json.loads(line[len(MARK):])
    return found, errors


def run(data: str, seed: int, last: str, work: Path) -> dict:
    """Execute one variant with nbclient (errors recorded, not raised) and return its JSON row."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.reads(json.dumps(build(data, seed, last, work / f"{data}-{seed}")), as_version=4)
    client = NotebookClient(nb, timeout=1800, kernel_name="python3", allow_errors=True,
                            resources={"metadata": {"path": str(ROOT / "notebooks")}})
    start = time.monotonic()
    client.execute(env={**os.environ, "SELFLLM_SMOKE": "1"})
    report, errors = read_report(nb.cells)
    return {"data": data, "seed": seed, "upto": last, "wall_s": round(time.monotonic() - start),
            "report": report, "errors": errors}


def numbers(row: dict) -> dict[str, float]:
    """The shares and agreements of one run's row, flat (NUMBERS' names); None ones left out."""
    report = row.get("report") or {}
    flat = {}
    for when in ("before", "after"):
        for key, value in (report.get(f"eval_{when}") or {}).items():
            flat[f"{when}.{key}"] = value
    flat.update(report.get("agreement") or {})
    return {k: flat[k] for k in NUMBERS if flat.get(k) is not None}


def summary(rows: list[dict]) -> str:
    """Per dataset, each number's min and median over the runs (and the seeds and failed cells)."""
    lines = []
    for data in sorted({r["data"] for r in rows}):
        runs = [r for r in rows if r["data"] == data]
        lines.append(f"{data}: seeds {sorted(r['seed'] for r in runs)}")
        per_run = [numbers(r) for r in runs]
        for name in NUMBERS:
            values = [n[name] for n in per_run if name in n]
            if values:
                lines.append(f"  {name:24} n={len(values):<3} min {min(values):.3f}  median "
                             f"{statistics.median(values):.3f}  all {[round(v, 3) for v in values]}")
        for r in runs:
            for e in r["errors"]:
                lines.append(f"  seed {r['seed']}: cell {e['cell']} raised {e['error'][:120]}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 0, 1])
    parser.add_argument("--data", nargs="+", default=["course", "bakery"], choices=["course", "bakery"])
    parser.add_argument("--upto", default="eval", choices=sorted(UPTO))
    parser.add_argument("--out", type=Path, help="append each run's JSON line to this file")
    parser.add_argument("--summarize", type=Path, help="only print the table of an --out file")
    args = parser.parse_args()
    if args.summarize:
        print(summary([json.loads(line) for line in args.summarize.read_text().splitlines() if line.strip()]))
        return
    if not registry.smoke_mode():
        raise SystemExit("set SELFLLM_SMOKE=1: the thresholds measured are the smoke mode's")
    rows = []
    with tempfile.TemporaryDirectory(prefix="notebook-seeds-") as work:
        for seed in args.seeds:
            for data in args.data:
                row = run(data, seed, args.upto, Path(work))
                rows.append(row)
                line = json.dumps(row, ensure_ascii=False)
                print(line, flush=True)
                if args.out:
                    with args.out.open("a", encoding="utf-8") as f:
                        f.write(line + "\n")
    print(summary(rows))


if __name__ == "__main__":
    main()
