"""A results file of train_speed.py rendered as the README's speed table: the figures have one source.

`benchmarks/results/*.jsonl` holds the JSON lines a GPU run printed, as they came. The README quotes a
table between the markers `<!-- speed-table: FILE -->` and `<!-- /speed-table -->`; this script renders
it from FILE, and tests/test_benchmarks.py checks the README's copy is that rendering. A marker may
name the models it shows (`<!-- speed-table: FILE qwen2,glm4 -->`, or one cap: `qwen2@24`, `qwen2@none`), where a
later run replaced the others. Rows a second machine ran (see `load`) are compared only with that machine's.
tokens/s counts every timed step; where a partly filled pack fell among them, the rate over full steps
stands beside it, and tools are compared by that rate (`train_speed.full_steps_rate`):

    python benchmarks/report.py benchmarks/results/FILE.jsonl   # print the table
    python benchmarks/report.py --update README.md              # rewrite every marked table
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"deepseek": "DeepSeek-7B", "qwen2": "Qwen2-7B", "glm4": "GLM-4-9B"}
MIXES = {"chat": "Chat-甄嬛", "alpaca": "类 Alpaca", "long": "长对话"}
# issue 24's targets for the course's default: (model, cap GiB) -> least tokens/s (on the mixes named,
# or all), least ratio to the fastest anchor (Unsloth or TRL) of the same mix and run
TARGETS = {("deepseek", 5.5): (6000, ("chat",), 1.15), ("qwen2", 24): (13000, None, None),
           ("glm4", 24): (9000, None, None), ("qwen2", None): (None, None, 1.8)}
BLOCK = re.compile(r"(<!-- speed-table: (\S+)(?: (\S+))? -->\n)(.*?)(<!-- /speed-table -->)", re.S)


def load(path: Path) -> list[dict]:
    """The configuration lines of a run (checks and blank lines left out), in the order they ran.
    A run's first line (`"run": N`) may list, as `second_machine`, the configurations a fresh
    machine ran after the first was handed back: each record's `machine` is 1 or 2. A configuration
    run again (its first try failed; the first line says why) counts by its last line."""
    lines = [json.loads(l) for l in path.read_text(encoding="utf-8").splitlines() if l.startswith("{")]
    later = set(next((l for l in lines if "run" in l), {}).get("second_machine", []))
    records = [r for r in lines if "config" in r and "profiled" not in r]
    last = {r["config"]: i for i, r in enumerate(records)}
    records = [r for i, r in enumerate(records) if last[r["config"]] == i]
    for r in records:  # a configuration that failed printed only its name and error
        r.setdefault("mix", next((m for m in MIXES if f"-{m}" in r["config"]), "chat"))
        r["machine"] = 2 if r["config"] in later else 1
    return records


def tool(r: dict) -> str:
    if r.get("unsloth"):
        return "unsloth"
    return "trl" if r.get("trl") or "-trl-" in r["config"] else "course"


def recipe(r: dict) -> str:
    return _recipe(r) + ("（第二台机器）" if r.get("machine") == 2 else "")


def _recipe(r: dict) -> str:
    if tool(r) == "unsloth":
        return f"Unsloth {r['unsloth']}（packing {r['pack_tokens']:,}，它的检查点，adamw_8bit）"
    if tool(r) == "trl":
        return f"TRL {r.get('trl') or ''}（BFD packing {r['pack_tokens']:,}，padding-free，Liger）".replace(" （", "（")
    how = "课程默认" if default(r) else "课程，手动设置"
    if "error" in r:
        return how
    if not r.get("checkpointing"):
        return f"{how}（不开检查点）"
    where = "层内" if r.get("checkpoint_inside") else "层外"
    return f"{how}（检查点{where}{'，层输入放主机内存' if r.get('offload') else ''}）"


def default(r: dict) -> bool:
    """The settings a learner gets (the `*-course-*` configurations), not a variant set by hand."""
    return tool(r) == "course" and "-course-" in r["config"]


def group(r: dict) -> tuple[str, float | None]:
    return r["config"].split("-")[0], r.get("cap_gib")


def versus(r: dict, records: list[dict]) -> str:
    """The target the course's row must meet and its ratio to the best anchor of the same run:
    over full steps where this row and its anchors all have that rate (runs from 22 on), and only
    against anchors that ran on the same machine."""
    target = TARGETS.get(group(r))
    if not default(r) or not target or "tokens_per_s" not in r:
        return ""
    least, mixes, ratio = target
    out = []
    if least and (mixes is None or r["mix"] in mixes):
        out.append(f"≥ {least:,} {'✓' if r['tokens_per_s'] >= least else '✗'}")
    anchors = [a for a in records if tool(a) != "course" and group(a)[0] == group(r)[0]
               and a["mix"] == r["mix"] and "tokens_per_s" in a and a.get("cap_gib") == r.get("cap_gib")]
    if anchors and all(a["machine"] != r["machine"] for a in anchors):
        out.append("对照在另一台机器上，不比")  # speeds differ between machines: compare within one
    anchors = [a for a in anchors if a["machine"] == r["machine"]]
    if anchors:
        key = "tokens_per_s_full" if all(a.get("tokens_per_s_full") for a in anchors + [r]) else "tokens_per_s"
        best = max(anchors, key=lambda a: a[key])
        x = r[key] / best[key]
        name = "Unsloth" if tool(best) == "unsloth" else "TRL"
        out.append(f"{x:.2f} 倍 {name}{f'（≥ {ratio} ' + ('✓' if x >= ratio else '✗') + '）' if ratio else ''}")
    return "；".join(out)


def row(r: dict, records: list[dict], first: bool) -> str:
    key, cap = group(r)
    model = f"{MODELS[key]}{' 4-bit' if key == 'deepseek' else ''}（{f'{cap:g} GiB' if cap else '不限显存'}）" \
        if first else ""
    tokens = r.get("batch_tokens") or r.get("pack_tokens")
    speed = f"**{r['tokens_per_s']:,}**" if default(r) and "tokens_per_s" in r else \
        f"{r['tokens_per_s']:,}" if "tokens_per_s" in r else "出错：" + r.get("error", "?")[-80:].replace("|", "/")
    if r.get("short_steps"):  # a partly filled pack among the timed steps: the full steps' rate beside it
        speed += f"（满步 {r['tokens_per_s_full']:,}）"
    memory = f"{r['peak_allocated_gib']:.2f} / {r['peak_reserved_gib']:.2f}" if "peak_allocated_gib" in r else ""
    est = f"{r['estimate_allocated_gib']:.2f}" if r.get("estimate_allocated_gib") else ""
    first = f"{r['first_step_s']} s" if r.get("first_step_s") else ""
    return (f"| {model} | {recipe(r)} | {MIXES[r['mix']]} | {tokens:,} | {speed} | {versus(r, records)} "
            f"| {memory} | {est} | {first} |") if tokens else \
        f"| {model} | {recipe(r)} | {MIXES[r['mix']]} | | {speed} | | | | |"


def shown(r: dict, models: str) -> bool:
    """Whether a marker's list (`qwen2,glm4`, or `qwen2@24,qwen2@none`: a model under one cap) takes `r`."""
    key, cap = group(r)
    return any(m in (key, f"{key}@{'none' if cap is None else f'{cap:g}'}") for m in models.split(","))


def table(path: Path, models: str | None = None) -> str:
    """The markdown table of one results file: a row a configuration, grouped by model and cap; only
    the models named (comma-separated keys of MODELS, or key@cap: see `shown`) where `models` is given."""
    records = [r for r in load(path) if models is None or shown(r, models)]
    groups = list(TARGETS) + sorted({group(r) for r in records} - set(TARGETS), key=str)
    records.sort(key=lambda r: (groups.index(group(r)), list(MIXES).index(r["mix"]), tool(r) != "course"))
    anchors = [r for r in records if tool(r) != "course" and "tokens_per_s" in r]
    full = bool(anchors) and all(r.get("tokens_per_s_full") for r in anchors)
    head = ("| 模型（显存上限） | 做法 | 数据 | 每步 token | tokens/s | 目标；对照（同一次运行里最快的 Unsloth / TRL 行"
            f"{'，按装满的步比' if full else ''}） "
            "| 峰值显存 已分配 / 已预留 (GiB) | 估算 (GiB) | 第 1 步（编译） |\n"
            "| --- | --- | --- | ---: | ---: | --- | --- | ---: | ---: |\n")
    return head + "".join(row(r, records, i == 0 or group(r) != group(records[i - 1])) + "\n"
                          for i, r in enumerate(records))


def update(text: str, root: Path = ROOT) -> str:
    """`text` with every marked table rendered again from the results file its marker names."""
    return BLOCK.sub(lambda m: m[1] + table(root / m[2], m[3]) + m[5], text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="?", type=Path)
    parser.add_argument("--update", type=Path, help="a markdown file whose marked tables are rewritten")
    args = parser.parse_args()
    if args.update:
        args.update.write_text(update(args.update.read_text(encoding="utf-8")), encoding="utf-8")
    elif args.results:
        print(table(args.results), end="")
    else:
        parser.error("give a results file or --update FILE")


if __name__ == "__main__":
    main()
