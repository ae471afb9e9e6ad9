"""How a comparison is drawn: table cells, markdown, the terminal table, Pareto fronts, plots.

Pure rendering of aggregated rows (``report.aggregate``); report.md, report.html and the search
report all draw with these.
"""

from __future__ import annotations

from pathlib import Path

from peftkit.io import atomic_write_bytes

BASELINE = "full"  # ratios in the table are relative to this strategy


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


def plot(aggs: list[dict], key: str, xlabel: str, path: Path, lower_x_better: bool, scale: float = 1.0,
         xerr_key: str | None = None, ref: dict | None = None) -> bool:
    """``xerr_key``: each point's x uncertainty; ``ref``: the untrained model's metric, drawn as a line."""
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
        ax.errorbar(x, y, yerr=a["metric_std"] or 0, xerr=(a.get(xerr_key) or 0) / scale if xerr_key else None, fmt="o", ms=8 if on else 6, capsize=3,
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
    if ref is not None and ref.get("metric") is not None:
        ax.axhline(ref["metric"], color="0.4", ls=":", lw=1.2, label="untrained model")
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
