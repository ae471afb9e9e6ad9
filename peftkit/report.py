"""Results of a comparison -> report.json (data), report.md + terminal table, two Pareto plots.

Everything rendered here is computed from the run directories' result.json files.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from .errors import UserError
from .io import atomic_write_bytes, atomic_write_json, atomic_write_text

SCHEMA = "peftkit.report/1"
BASELINE = "full"


def primary(res: dict) -> tuple[str, float | None]:
    """The task's primary metric name and value of one result."""
    metrics = res.get("metrics") or {}
    # As the run recorded it: a generation task's depends on its task.metric, not on its class.
    name = metrics.get("primary_metric") or (res.get("task") or {}).get("primary_metric")
    if name is None:  # a result without it
        from . import tasks

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
            rows.append(_row(json.loads((d / "result.json").read_text()), variant, seed))
        elif (d / "error.json").exists():
            e = json.loads((d / "error.json").read_text())
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
        out.append(agg)
    base = next((a for a in out if a["strategy"] == BASELINE), None)
    for a in out:
        a["vs_full"] = ({k: (a[k] / base[k] if a[k] is not None and base[k] else None)
                         for k in ("trainable", "artifact_bytes", "peak_bytes", "measured_bytes", "tokens_per_s",
                                   "train_s", "metric")} if base is not None else None)
    return out


# -- formatting ---------------------------------------------------------------------------
def _mib(b) -> str:
    if b is None:
        return "–"
    if b < 2**20:
        return f"{b / 2**10:,.1f} KiB"
    return f"{b / 2**20:,.1f} MiB" if b < 10 * 2**30 else f"{b / 2**30:,.2f} GiB"


def _count(n) -> str:
    if n is None:
        return "–"
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(int(n))


def _ratio(a: dict, key: str) -> str:
    r = (a.get("vs_full") or {}).get(key)
    return "" if r is None or a["strategy"] == BASELINE else f" · {r:.2f}x"


COLUMNS = ["Variant", "Trainable", "Artifact", "Peak memory", "Estimate (error)", "Measured", "Tokens/s",
           "Train time", "METRIC"]


def cells(a: dict) -> list[str]:
    err = a["estimate_error"]
    metric = "–" if a["metric"] is None else f"{a['metric']:.4f}" + (
        f" ± {a['metric_std']:.4f}" if a["metric_std"] is not None else "")
    return [
        a["variant"] + ("" if a["variant"] == a["strategy"] else f" ({a['strategy']})"),
        f"{_count(a['trainable'])} ({a['trainable_pct']:.2f}%)" + _ratio(a, "trainable"),
        _mib(a["artifact_bytes"]) + _ratio(a, "artifact_bytes"),
        _mib(a["peak_bytes"]) + _ratio(a, "peak_bytes"),
        _mib(a["estimate_bytes"]) + ("" if err is None else f" ({100 * err:+.1f}%)"),
        _mib(a["measured_bytes"]) + _ratio(a, "measured_bytes"),
        ("–" if a["tokens_per_s"] is None else f"{a['tokens_per_s']:,.0f}") + _ratio(a, "tokens_per_s"),
        ("–" if a["train_s"] is None else f"{a['train_s']:,.1f} s") + _ratio(a, "train_s"),
        metric + _ratio(a, "metric"),
    ]


def markdown(aggs: list[dict], failed: list[dict], title: str, precision: str | None = None) -> str:
    metric = aggs[0]["metric_name"] if aggs else "metric"
    cols = [c.replace("METRIC", metric) for c in COLUMNS]
    lines = [f"# {title}", ""]
    if aggs:
        seeds = max(len(a["seeds"]) for a in aggs)
        cpu = aggs[0]["measured_method"] != "cuda"
        lines += [f"Device: {aggs[0]['device']}; precision: {precision or 'not recorded'}; seeds per variant: {seeds}; "
                  + ("ratios are relative to `full`." if any(a["vs_full"] for a in aggs) else "no `full` run to compare with."),
                  "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(cells(a)) + " |" for a in aggs]
        lines += ["",
                  "- **Peak memory**: measured peak of live tensor memory over one whole training step after "
                  "warm-up (forward, backward, optimizer step), " + ("every tensor storage tracked (CPU)." if cpu else
                                                                    "`torch.cuda.max_memory_allocated`."),
                  "- **Estimate**: the same step traced on fake tensors before loading weights (`peftkit estimate`), "
                  "at the measured step's batch shape; error vs the measured peak.",
                  "- **Measured**: " + ("peak RSS of the training process above its level after loading the model "
                                        "(weights excluded; includes allocator and backward temporaries)." if cpu else
                                        "max_memory_allocated."),
                  f"- **Tokens/s**: real (non-padding) training tokens per second after warm-up; **{metric}**: "
                  "mean ± std over seeds on the evaluation split.",
                  "", "![accuracy vs memory](accuracy_vs_memory.png) ![accuracy vs speed](accuracy_vs_speed.png)"]
    if failed:
        lines += ["", "## Failed runs", ""]
        lines += [f"- {f['variant']} seed {f['seed']}: {f['message']}" for f in failed]
    return "\n".join(lines) + "\n"


def print_table(aggs: list[dict], failed: list[dict], title: str, echo=print) -> None:
    from rich.console import Console
    from rich.table import Table

    metric = aggs[0]["metric_name"] if aggs else "metric"
    t = Table(title=title)
    for c in COLUMNS:
        t.add_column(c.replace("METRIC", metric), justify="left" if c == "Variant" else "right")
    for a in aggs:
        t.add_row(*cells(a))
    console = Console(width=200)
    console.print(t)
    for f in failed:
        console.print(f"[red]failed[/red] {f['variant']} seed {f['seed']}: {f['message']}")


# -- plots --------------------------------------------------------------------------------
def pareto(points: list[tuple[float, float]], lower_x_better: bool) -> list[int]:
    """Indices of points no other point beats on both axes (higher y always better)."""
    front = []
    for i, (x, y) in enumerate(points):
        better_x = (lambda a, b: a <= b) if lower_x_better else (lambda a, b: a >= b)
        dominated = any(better_x(x2, x) and y2 >= y and (x2, y2) != (x, y) for j, (x2, y2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return front


def plot(aggs: list[dict], key: str, xlabel: str, path: Path, lower_x_better: bool, scale: float = 1.0) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [a for a in aggs if a[key] is not None and a["metric"] is not None]
    if not pts:
        return False
    xy = [(a[key] / scale, a["metric"]) for a in pts]
    front = pareto(xy, lower_x_better)
    fig, ax = plt.subplots(figsize=(7, 4.6), dpi=120)
    rank = {i: r for r, i in enumerate(sorted(range(len(xy)), key=lambda i: xy[i]))}
    for i, (a, (x, y)) in enumerate(zip(pts, xy)):
        on = i in front
        ax.errorbar(x, y, yerr=a["metric_std"] or 0, fmt="o", ms=8 if on else 6, capsize=3,
                    color="tab:red" if on else "tab:blue", zorder=3)
        # Neighbours along x get labels above/below in turn so close points stay readable.
        # A leader line ties each label to its own point when points crowd together.
        ax.annotate(a["variant"], (x, y), textcoords="offset points", xytext=(12, 10 if rank[i] % 2 == 0 else -18),
                    fontsize=9, arrowprops=dict(arrowstyle="-", lw=0.6, color="0.45"))
    fx = sorted((xy[i] for i in front), key=lambda p: p[0])
    if len(fx) > 1:
        ax.plot([p[0] for p in fx], [p[1] for p in fx], "--", color="tab:red", lw=1.2, zorder=2,
                label="Pareto front")
    else:
        ax.plot([], [], "o", color="tab:red", label="Pareto front")
    metric = pts[0]["metric_name"]
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{metric} (eval)")
    better = "← better" if lower_x_better else "better →"
    ax.set_title(f"{metric} vs {xlabel.split(' (')[0].lower()}  ({better}, up = better)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.margins(x=0.15, y=0.15)
    ax.legend(loc="best", fontsize=8)
    save_png(fig, path)
    return True


def save_png(fig, path: Path) -> None:
    import io

    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def report(out: str | Path, echo=print) -> dict:
    out = Path(out)
    if not out.is_dir():
        raise UserError(f"{out}: not a directory of comparison runs")
    rows, failed, order = collect(out)
    if not rows and not failed:
        raise UserError(f"{out}: no runs found (expected {out}/<variant>/seed<k>/result.json)")
    aggs = aggregate(rows, order)
    title = f"peftkit comparison: {out.name}"
    data = {"schema": SCHEMA, "title": title, "baseline": BASELINE if any(a["vs_full"] for a in aggs) else None,
            "variants": aggs, "runs": rows, "failed": failed, "precision": precision_used(rows, _planned_precision(out))}
    atomic_write_json(out / "report.json", data)
    cpu = bool(aggs) and aggs[0]["measured_method"] != "cuda"
    mem_label = "peak memory (MiB, measured live peak)" if cpu else "peak memory (MiB, max allocated)"
    plot(aggs, "peak_bytes", mem_label, out / "accuracy_vs_memory.png", True, 2**20)
    plot(aggs, "tokens_per_s", "throughput (training tokens/s)", out / "accuracy_vs_speed.png", False)
    atomic_write_text(out / "report.md", markdown(aggs, failed, title, data["precision"]))
    from .report_html import write as write_html  # report.html: same data, one self-contained page

    write_html(out, data)
    print_table(aggs, failed, title, echo)
    if (out / "search.json").exists():  # a search: grid, test CIs, recommendation (peftkit.report_search)
        from .report_search import render

        data = render(out, echo) or data
    echo(f"report: {out / 'report.md'}")
    return data
