"""SST-2 accuracy across strategies: ``peftkit compare`` on benchmarks/sst2/compare.yaml, then a table.

Every strategy trains builtin MiniLM on the same 20,000-sentence subset of SST-2 train for one
epoch (max length 64, bf16), for each seed, in its own process; test accuracy on test.tsv (the
872-sentence GLUE dev set) as mean ± std over seeds, with peak memory and time.

    python benchmarks/sst2_accuracy.py                     # runs compare, writes results/sst2_accuracy.*
    python benchmarks/sst2_accuracy.py --table-only runs/sst2-compare   # re-render an existing run
    python benchmarks/sst2_accuracy.py --set task.data.max_train_samples=2000 --seeds-note "..."
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

COMPARE = Path(__file__).resolve().parent / "sst2" / "compare.yaml"
# Targets (printed, never asserted): full >= 89%; LoRA and adapters within 1 point of full;
# QLoRA within 1.5 points of LoRA.
TARGETS = {"full": ("abs", 0.89), "lora": ("vs", "full", 0.01), "adapter": ("vs", "full", 0.01),
           "qlora": ("vs", "lora", 0.015)}


def collect(out: Path) -> dict:
    """Per variant: accuracy mean/std over seeds, peak memory, train and wall time."""
    index = json.loads((out / "compare.json").read_text())
    rows: dict = {}
    for r in index["runs"]:
        d = out / r["dir"]
        entry = rows.setdefault(r["variant"], {"strategy": r["strategy"], "runs": []})
        try:
            res = json.loads((d / "result.json").read_text())
        except (OSError, ValueError):
            entry["runs"].append({"seed": r["seed"], "error": (d / "error.json").exists()})
            continue
        entry["runs"].append({
            "seed": r["seed"], "accuracy": res["metrics"]["eval"]["accuracy"],
            "examples": res["metrics"]["eval"]["examples"],
            "peak_bytes": res["memory"]["measured"].get("peak_bytes"), "train_s": res["speed"].get("train_s"),
            "wall_s": res["speed"].get("wall_s"), "samples_per_s": res["speed"].get("train_samples_per_s"),
            "trainable": res["params"]["trainable"], "total": res["params"]["total"], "env": res.get("env")})
    for v in rows.values():
        ok = [x for x in v["runs"] if "accuracy" in x]
        acc = [x["accuracy"] for x in ok]
        v["accuracy_mean"] = statistics.mean(acc) if acc else None
        v["accuracy_std"] = statistics.stdev(acc) if len(acc) > 1 else 0.0 if acc else None
        for k in ("peak_bytes", "train_s", "wall_s", "samples_per_s"):
            xs = [x[k] for x in ok if x.get(k) is not None]
            v[k + "_median"] = statistics.median(xs) if xs else None
        v["trainable_pct"] = 100 * ok[0]["trainable"] / ok[0]["total"] if ok else None
        v["seeds_ok"], v["seeds"] = len(ok), len(v["runs"])
    return rows


def verdict(name: str, rows: dict) -> str:
    t = TARGETS.get(name)
    m = rows[name]["accuracy_mean"]
    if t is None or m is None:
        return ""
    if t[0] == "abs":
        return f"≥{100 * t[1]:.0f}%: " + ("met" if m >= t[1] else "missed")
    ref = rows.get(t[1], {}).get("accuracy_mean")
    if ref is None:
        return ""
    return f"within {100 * t[2]:.1f} pt of {t[1]}: " + ("met" if m >= ref - t[2] else f"missed ({100 * (m - ref):+.1f} pt)")


def markdown(rows: dict, meta: dict, env: dict) -> str:
    lines = ["# SST-2 accuracy across strategies (MiniLM)", "",
             f"`peftkit compare {meta['compare']}` {' '.join(meta['overrides'])}: same data subset, order, budget "
             "and evaluation for every strategy; accuracy on SST-2 test.tsv (GLUE dev, 872 sentences), mean ± std "
             f"over seeds; peak memory and times are medians. Whole table: {meta['wall_s'] / 60:.1f} min.", "",
             "| strategy | trainable % | accuracy (mean ± std) | seeds | peak MiB | train s | samples/s | target |",
             "|---|---|---|---|---|---|---|---|"]
    for name, v in rows.items():
        acc = "failed" if v["accuracy_mean"] is None else \
            f"{100 * v['accuracy_mean']:.2f} ± {100 * v['accuracy_std']:.2f}"
        pk = v["peak_bytes_median"]
        lines.append(f"| {name} | {common.fmt(v['trainable_pct'], 2)} | {acc} | {v['seeds_ok']}/{v['seeds']} | "
                     f"{common.fmt(pk / 2**20 if pk else None, 0)} | {common.fmt(v['train_s_median'], 0)} | "
                     f"{common.fmt(v['samples_per_s_median'])} | {verdict(name, rows)} |")
    lines += ["", "## Environment", "", *common.env_lines(env),
              f"- load average at end: {', '.join(f'{x:.2f}' for x in meta['loadavg_end'])}", ""]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--compare", type=Path, default=COMPARE)
    p.add_argument("--runs", type=Path, default=common.ROOT / "runs" / "sst2-compare")
    p.add_argument("--set", nargs="*", default=[], help="dotted overrides passed to peftkit compare")
    p.add_argument("--table-only", action="store_true", help="only render the table from --runs")
    p.add_argument("--out", type=Path, default=common.RESULTS)
    args = p.parse_args(argv)
    overrides = [f"task.data.dir={common.SST2}", *args.set]
    env = common.environment()
    t0 = time.time()
    if not args.table_only:
        cmd = [sys.executable, "-m", "peftkit", "compare", str(args.compare), *overrides, "--out", str(args.runs)]
        print("$", " ".join(cmd), flush=True)
        penv = {**os.environ, "PYTHONPATH": str(common.ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        rc = subprocess.run(cmd, cwd=common.ROOT, env=penv).returncode
        if rc != 0:
            print(f"peftkit compare exited {rc}; tabulating what finished", file=sys.stderr)
    rows = collect(args.runs)
    wall = time.time() - t0
    if args.table_only:  # the runs' own wall times (sequential): how long the table took to make
        wall = sum(x.get("wall_s") or 0 for v in rows.values() for x in v["runs"])
    meta = {"compare": str(args.compare.relative_to(common.ROOT)) if args.compare.is_relative_to(common.ROOT)
            else str(args.compare), "overrides": overrides, "wall_s": wall,
            "loadavg_end": os.getloadavg(), "runs_dir": str(args.runs)}
    common.publish("sst2_accuracy", {"schema": "peftkit.bench.sst2/1", "meta": meta, "env": env, "variants": rows},
                   markdown(rows, meta, env), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
