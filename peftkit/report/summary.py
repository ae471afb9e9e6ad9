"""Results of a comparison -> report.json (data), report.md + terminal table, two Pareto plots.

Everything rendered here is computed from the run directories' result.json files.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from peftkit.errors import UserError
from peftkit.io import atomic_write_json, atomic_write_text, read_json
from peftkit.report import forgetting as F
from peftkit.training.rundir import WEIGHTS, check_weights
from peftkit.report.table import BASELINE, markdown, plot, print_table

SCHEMA = "peftkit.report/1"


def primary(res: dict) -> tuple[str, float | None]:
    """The task's primary metric name and value of one result."""
    metrics = res.get("metrics") or {}
    # As the run recorded it: a generation task's depends on its task.metric, not on its class.
    name = metrics.get("primary_metric") or (res.get("task") or {}).get("primary_metric")
    if name is None:  # a result without it
        from peftkit import tasks

        name = getattr(tasks.REGISTRY.get((res.get("run") or {}).get("task")), "primary_metric", "accuracy")
    return name, (metrics.get("eval") or {}).get(name)


def _row(res: dict, variant: str, seed) -> dict:
    mem, speed = res.get("memory", {}), res.get("speed", {})
    measured = mem.get("measured", {})
    acc_total = (mem.get("accounting") or {}).get("total_bytes")  # results written before the live peak
    est = mem.get("estimate_at_measured_shape") or mem.get("estimate") or {}
    name, value = primary(res)
    cuda = measured.get("method") == "cuda"
    return {
        "variant": variant, "seed": seed, "strategy": res["run"]["strategy"],
        "trainable": res["params"]["trainable"], "total_params": res["params"]["total"],
        "trainable_pct": res["params"]["trainable_pct"],
        "artifact_bytes": (res.get("artifact") or {}).get("strategy_bytes"),
        "accounted_bytes": acc_total,
        "estimate_bytes": est.get("peak_bytes", est.get("total_bytes")),
        "estimate_error": (mem.get("errors") or {}).get("estimate_vs_measured"),
        "estimate_vs_measured": (mem.get("errors") or {}).get("estimate_vs_measured"),
        "measured_bytes": measured.get("peak_bytes"),
        "measured_method": measured.get("method"),
        # The memory axis: the measured live peak of one whole step (memory.section), else older keys.
        "peak_bytes": mem.get("peak_bytes") or (measured.get("peak_bytes") if cuda else acc_total),
        "tokens_per_s": speed.get("train_tokens_per_s"),
        "samples_per_s": speed.get("train_samples_per_s"),
        "step_time_s": speed.get("step_time_median_s"),
        "train_s": speed.get("train_s"),
        "wall_s": speed.get("wall_s"),
        "metric_name": name, "metric": value,
        "device": (res.get("env") or {}).get("device"),
        "precision": res["run"].get("precision"),  # hardware.Precision.record(): requested, resolved, reason
        **F.run_fields(res),  # forgetting (decoders): rise in LM loss on general text
    }


def precision_used(rows: list[dict], planned: dict | None = None) -> str | None:
    """One line: the precision every run trained in (compare pins one; ``planned``: how it resolved)."""
    ran = [r for r in rows if r.get("precision")]
    got = {r["precision"]["resolved"] for r in ran} | ({planned["resolved"]} if planned else set())
    if len(got) > 1:
        return "mixed: " + ", ".join(f"{r['variant']} {r['precision']['resolved']}" for r in ran)
    rec = planned or (ran[0]["precision"] if ran else None)
    return f"{rec['resolved']} (requested {rec['requested']}: {rec['reason']})" if rec else None


def _planned_precision(out: Path) -> dict | None:
    try:
        return json.loads((out / "compare.json").read_text()).get("precision")
    except (OSError, ValueError):
        return None


def collect(out: Path) -> tuple[list[dict], list[dict], list[str]]:
    """(per-run rows, failures, variant order) from DIR/<variant>/seed<k>/."""
    order: list[str] = []
    plan = out / "compare.json"
    if plan.exists():
        order = json.loads(plan.read_text()).get("variants", [])
    rows, failed = [], []
    for d in sorted(out.glob("*/seed*")):
        if not d.is_dir():
            continue
        variant, seed = d.parent.name, d.name.removeprefix("seed")
        seed = int(seed) if seed.isdigit() else seed
        if (d / "result.json").exists():
            res = read_json(d / "result.json", "; run it again (compare retrains it) or remove the file")
            if (d / WEIGHTS).is_file():  # the weights the row describes are the ones the run wrote
                check_weights(d, WEIGHTS)
            rows.append(_row(res, variant, seed))
        elif (d / "error.json").exists():
            e = read_json(d / "error.json")
            failed.append({"variant": variant, "seed": seed, "message": e.get("message"),
                           "returncode": e.get("returncode")})
    seen = order + sorted({r["variant"] for r in rows + failed} - set(order),
                          key=lambda v: (v != BASELINE, v))
    return rows, failed, [v for v in seen if any(r["variant"] == v for r in rows + failed)]


def _mean(xs):
    xs = [x for x in xs if isinstance(x, (int, float))]
    return statistics.fmean(xs) if xs else None


def aggregate(rows: list[dict], order: list[str]) -> list[dict]:
    out = []
    for v in order:
        rs = [r for r in rows if r["variant"] == v]
        if not rs:
            continue
        agg = {"variant": v, "strategy": rs[0]["strategy"], "seeds": [r["seed"] for r in rs],
               "metric_name": rs[0]["metric_name"]}
        for k in ("trainable", "total_params", "trainable_pct", "artifact_bytes", "accounted_bytes", "estimate_bytes",
                  "estimate_error", "estimate_vs_measured", "measured_bytes", "peak_bytes", "tokens_per_s",
                  "samples_per_s", "step_time_s", "train_s", "wall_s", "metric"):
            agg[k] = _mean(r[k] for r in rs)
        ms = [r["metric"] for r in rs if isinstance(r["metric"], (int, float))]
        agg["metric_std"] = statistics.stdev(ms) if len(ms) > 1 else None
        agg["measured_method"] = rs[0]["measured_method"]
        agg["device"] = rs[0]["device"]
        F.aggregate(agg, rs)
        out.append(agg)
    base = next((a for a in out if a["strategy"] == BASELINE), None)
    for a in out:
        a["vs_full"] = ({k: (a[k] / base[k] if a[k] is not None and base[k] else None)
                         for k in ("trainable", "artifact_bytes", "peak_bytes", "measured_bytes", "tokens_per_s",
                                   "train_s", "metric")} if base is not None else None)
    return out


def report(out: str | Path, echo=print) -> dict:
    out = Path(out)
    if not out.is_dir():
        raise UserError(f"{out}: not a directory of comparison runs")
    rows, failed, order = collect(out)
    if not rows and not failed:
        raise UserError(f"{out}: no runs found (expected {out}/<variant>/seed<k>/result.json)")
    ref = F.reference(out, primary)  # the untrained model (peftkit.runs.reference), when the comparison ran it
    F.against_reference(rows, ref)
    aggs = aggregate(rows, order)
    F.mark(aggs, ref)
    rec = F.recommend(aggs)
    title = f"peftkit comparison: {out.name}"
    data = {"schema": SCHEMA, "title": title, "baseline": BASELINE if any(a["vs_full"] for a in aggs) else None,
            "variants": aggs, "runs": rows, "failed": failed, "precision": precision_used(rows, _planned_precision(out)),
            "reference": ref, "recommendation": rec}
    atomic_write_json(out / "report.json", data)
    cpu = bool(aggs) and aggs[0]["measured_method"] != "cuda"
    mem_label = "peak memory (MiB, measured live peak)" if cpu else "peak memory (MiB, max allocated)"
    plot(aggs, "peak_bytes", mem_label, out / "accuracy_vs_memory.png", True, 2**20)
    plot(aggs, "tokens_per_s", "throughput (training tokens/s)", out / "accuracy_vs_speed.png", False)
    F.plot(aggs, ref, out / "accuracy_vs_forgetting.png")
    atomic_write_text(out / "report.md", markdown(aggs, failed, title, data["precision"]) + F.markdown(aggs, ref, rec))
    from peftkit.report.html import write as write_html  # report.html: same data, one self-contained page

    write_html(out, data)
    print_table(aggs, failed, title, echo)
    for line in F.echo_lines(aggs, ref, rec):
        echo(line)
    if (out / "search.json").exists():  # a search: grid, test CIs, recommendation (peftkit.report.search)
        from peftkit.report.search import render

        data = render(out, echo) or data
    echo(f"report: {out / 'report.md'}")
    return data
