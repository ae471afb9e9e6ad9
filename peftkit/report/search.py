"""A search's report, from data: the grid on validation, test with its uncertainty, a recommendation.

Reads ``search.json`` (validation metrics of every trial), ``report.json`` (the comparison's
aggregated test runs: one per seed at each variant's selected setting) and each test run's
``predictions.json``; adds ``search`` and ``recommendation`` to report.json and their sections
to report.md, draws ``search_validation.png`` and redraws the Pareto plots with 95% CIs.

Uncertainty of a variant's test metric: over seeds (t-interval) with >= 3 seeds; else a
bootstrap over test examples (resampled indices shared by all variants: paired). A variant is
significantly worse than the best when Welch's t-test (>= 3 seeds each) gives p < 0.05, or the
paired-bootstrap 95% interval of the difference excludes 0.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np

from peftkit.io import atomic_write_json, atomic_write_text

BOOT = 2000
ALPHA = 0.05


def _correct(run_dir: Path) -> np.ndarray | None:
    """Per test example 1/0 (prediction == reference) of one run; None if not per-example scalars."""
    try:
        p = json.loads((run_dir / "predictions.json").read_text())
    except (OSError, ValueError):
        return None
    preds, refs = p.get("predictions") or [], p.get("references") or []
    if p.get("split") != "test" or not preds or any(isinstance(x, (list, dict, str)) for x in preds[:1]):
        return None
    return (np.asarray(preds) == np.asarray(refs)).astype(float)


def uncertainty(values: list[float], correct: list[np.ndarray | None], idx: np.ndarray | None) -> dict:
    """mean, std and a 95% CI of one variant's test metric; ``boot`` holds its bootstrap draws."""
    from scipy import stats

    n = len(values)
    out = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if n > 1 else None, "n_seeds": n}
    if n >= 3:
        half = stats.t.ppf(1 - ALPHA / 2, n - 1) * out["std"] / np.sqrt(n)
        out.update(ci=[out["mean"] - half, out["mean"] + half], ci_method=f"t-interval over {n} seeds")
    elif idx is not None and all(c is not None and len(c) == idx.shape[1] for c in correct):
        per_example = np.mean(correct, axis=0)  # seeds averaged per example
        boot = per_example[idx].mean(axis=1)
        out.update(ci=[float(np.quantile(boot, ALPHA / 2)), float(np.quantile(boot, 1 - ALPHA / 2))],
                   ci_method=f"bootstrap over {idx.shape[1]} test examples ({BOOT} resamples, {n} seed(s))",
                   boot=boot)
    else:
        out.update(ci=None, ci_method="none (fewer than 3 seeds and no per-example correctness)")
    return out


def significantly_worse(best: dict, other: dict, best_vals: list, other_vals: list) -> dict:
    from scipy import stats

    diff = best["mean"] - other["mean"]
    if len(best_vals) >= 3 and len(other_vals) >= 3:
        p = float(stats.ttest_ind(best_vals, other_vals, equal_var=False).pvalue)
        return {"difference": diff, "test": "Welch t-test over seeds", "p": p, "worse": bool(p < ALPHA and diff > 0)}
    if "boot" in best and "boot" in other:
        d = best["boot"] - other["boot"]
        ci = [float(np.quantile(d, ALPHA / 2)), float(np.quantile(d, 1 - ALPHA / 2))]
        return {"difference": diff, "test": "paired bootstrap over test examples", "ci": ci, "worse": ci[0] > 0}
    return {"difference": diff, "test": "none", "worse": False}


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def budget_train_s(out: Path, run_dir: Path, s: dict) -> float | None:
    """Training seconds of one test run over the whole budget: a run that resumed the selected
    trial's checkpoint timed only its own steps; the trial's rungs timed the ones before."""
    speed = _read(run_dir / "result.json").get("speed") or {}
    if speed.get("train_s") is None:
        return None
    if not speed.get("resumed_from_step"):
        return speed["train_s"]
    sel = next((t for t in s.get("trials", []) if t["label"] == s.get("selected")), None)
    parts = [(_read(out / sel["dir"] / f"rung-{f}.json").get("speed") or {}).get("train_s")
             for f in (sel or {}).get("rungs", {})]
    return None if sel is None or None in parts else speed["train_s"] + sum(parts)


def _variants(out: Path, rep: dict, state: dict) -> list[dict]:
    n_ex = None
    per = {}
    for a in rep["variants"]:
        dirs = [out / a["variant"] / f"seed{s}" for s in a["seeds"]]
        vals = [r["metric"] for r in rep["runs"] if r["variant"] == a["variant"] and r["metric"] is not None]
        corr = [_correct(d) for d in dirs]
        n_ex = n_ex or next((len(c) for c in corr if c is not None), None)
        per[a["variant"]] = (a, vals, corr, dirs)
    idx = np.random.default_rng(0).integers(0, n_ex, size=(BOOT, n_ex)) if n_ex else None
    rows = []
    for v, (a, vals, corr, dirs) in per.items():
        if not vals:
            continue
        s = state["variants"].get(v, {})
        secs = [budget_train_s(out, d, s) for d in dirs]
        rows.append({"variant": v, "strategy": a["strategy"], "metric_name": a["metric_name"],
                     "selected": s.get("selected"), "selected_point": s.get("selected_point"),
                     "peak_bytes": a["peak_bytes"], "values": vals,
                     # the whole budget's training time (the compare table's covers the test run's own steps)
                     "train_s": statistics.fmean(secs) if secs and None not in secs else a["train_s"],
                     **uncertainty(vals, corr, idx), "edge": edge_warning(s)})
    return rows


def edge_warning(s: dict) -> str | None:
    pt = s.get("selected_point") or {}
    lrs = sorted({t["point"]["train.lr"] for t in s.get("trials", [])})
    lr = pt.get("train.lr")
    if lr is None or len(lrs) < 2:
        return None
    if lr in (lrs[0], lrs[-1]):
        side = "lowest" if lr == lrs[0] else "highest"
        return f"the selected lr {lr:g} is the {side} of the grid: the best rate may lie outside it; extend the grid"
    return None


def recommend(rows: list[dict]) -> dict:
    """The cheapest variant (peak memory, then train time) not significantly worse than the best."""
    if not rows:
        return {"text": "no finished test runs"}
    best = max(rows, key=lambda r: r["mean"])
    for r in rows:
        r["vs_best"] = None if r is best else significantly_worse(best, r, best["values"], r["values"])
    ok = [r for r in rows if r is best or not r["vs_best"]["worse"]]
    cheap = min(ok, key=lambda r: (r["peak_bytes"] if r["peak_bytes"] is not None else float("inf"),
                                   r["train_s"] if r["train_s"] is not None else float("inf")))
    worse = [r for r in rows if r is not best and r["vs_best"]["worse"]]
    return {"recommended": cheap["variant"], "best": best["variant"],
            "within_uncertainty": [r["variant"] for r in ok],
            "significantly_worse": [r["variant"] for r in worse], "text": _text(cheap, best, worse)}


def _fmt(r: dict) -> str:
    ci = f" (95% CI {r['ci'][0]:.3f}–{r['ci'][1]:.3f})" if r.get("ci") else ""
    sd = f" ± {r['std']:.3f}" if r.get("std") is not None else ""
    return f"{r['metric_name']} {r['mean']:.3f}{sd}{ci}"


def _text(cheap: dict, best: dict, worse: list[dict]) -> str:
    mem = f"{cheap['peak_bytes'] / 2**20:,.0f} MiB peak memory" if cheap["peak_bytes"] else "peak memory unknown"
    t = f"{cheap['train_s']:.0f} s training" if cheap["train_s"] is not None else "train time unknown"
    lr = (cheap["selected_point"] or {}).get("train.lr")
    head = f"**Recommended: {cheap['variant']}** ({cheap['strategy']}" + (f", lr {lr:g}" if lr else "") + ")"
    if cheap is best:
        s = f"{head}: the best test result, {_fmt(cheap)}, and the cheapest of those within its uncertainty ({mem}, {t})."
    else:
        s = (f"{head}: {_fmt(cheap)}, within the uncertainty of the best ({best['variant']}: {_fmt(best)}), "
             f"at {mem} and {t}: the cheapest such strategy.")
    if worse:
        s += " Significantly worse than " + best["variant"] + ": " + ", ".join(
            f"{r['variant']} ({r['mean']:.3f}, −{r['vs_best']['difference']:.3f})" for r in worse) + "."
    else:
        s += " No strategy is significantly worse than the best at this budget and number of seeds."
    if best.get("n_seeds", 0) < 3:
        s += (f" With {best.get('n_seeds', 1)} seed(s) the intervals cover the sampling of test examples only, "
              "not the randomness of training: run >= 3 seeds before trusting a small difference.")
    return s


def _rank_key(s: dict) -> str:
    """The rung field a variant's trials were ranked by (search.json ``ranked_by``)."""
    return "validation_loss" if s.get("ranked_by") == "loss" else "validation"


def plot_grid(state: dict, path: Path) -> bool:
    """Small multiples: validation metric over the lr grid, one panel per variant, selection marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    vs = [(v, s) for v, s in state["variants"].items() if s["trials"]]
    if not vs:
        return False
    cols = min(4, len(vs))
    nrows = -(-len(vs) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.6 * nrows), dpi=110, squeeze=False)
    for ax in axes.flat[len(vs):]:
        ax.set_visible(False)
    for ax, (v, s) in zip(axes.flat, vs):
        key = _rank_key(s)  # what the rungs ranked by: the chosen point is that curve's best
        for frac in [f"{f:g}" for _, f in s["rungs"]]:
            pts = sorted((t["point"]["train.lr"], t["rungs"][frac].get(key)) for t in s["trials"]
                         if frac in t["rungs"] and t["rungs"][frac].get(key) is not None)
            if pts:
                ax.plot(*zip(*pts), "o-", ms=4, lw=1, label=f"{float(frac):.0%} budget")
        sel = next((t for t in s["trials"] if t["label"] == s["selected"]), None)
        if sel and sel["rungs"]:
            last = sel["rungs"][max(sel["rungs"], key=float)]
            ax.plot(sel["point"]["train.lr"], last.get(key), "*", ms=14, color="tab:red", label="selected")
        ax.set_xscale("log")
        lrs = sorted({t["point"]["train.lr"] for t in s["trials"]})
        ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(lrs))  # the grid's rates, not 10^k
        ax.xaxis.set_major_formatter(matplotlib.ticker.FixedFormatter([f"{x:g}" for x in lrs]))
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_title(v if v == s["strategy"] else f"{v} ({s['strategy']})", fontsize=9)
        ax.set_xlabel("learning rate", fontsize=8)
        name = "loss" if key == "validation_loss" else (s["metric"] or "metric")
        ax.set_ylabel(f"{name} (validation, ranked by)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="best")
    from peftkit.report.table import save_png

    save_png(fig, path)
    return True


def markdown(state: dict, rows: list[dict], rec: dict) -> str:
    by = sorted({s.get("ranked_by") or s.get("metric") or "metric" for s in state["variants"].values()})
    lines = ["", "## Search (each strategy at its best setting, chosen on validation)", "",
             f"Successive halving (eta {state['eta']}) on the **validation** split, seed {state['seed']}, ranked by "
             f"{' / '.join(by)}" + (" (the validation loss: a proper score, where accuracy on a short rung is "
                                    "a step function that ties or crowns one-class predictors)" if "loss" in by else "")
             + "; the test split was evaluated only for the selected setting, once per seed. Train time: the "
             "whole budget of the selected setting, the search trial's steps and the test run's (the table above "
             "times only the steps a test run trained after resuming the trial's checkpoint).", "",
             "![validation over the grid](search_validation.png)", "",
             "| Variant | Validation over the grid (last rung reached) | Selected | Test (mean ± std) | 95% CI | CI method "
             "| Train time |",
             "|---|---|---|---|---|---|---|"]
    by = {r["variant"]: r for r in rows}
    for v, s in state["variants"].items():
        grid = []
        for t in s["trials"]:
            if t["error"]:
                grid.append(f"{t['label']}: failed")
            elif t["rungs"]:
                f = max(t["rungs"], key=float)
                val, loss = t["rungs"][f]["validation"], t["rungs"][f].get("validation_loss")
                shown = (f"loss {loss:.3f}, " if loss is not None else "") + f"{s['metric'] or 'metric'} {val:.3f}"
                grid.append(f"{t['label']}: {shown} ({float(f):.0%})" if val is not None else f"{t['label']}: –")
        r = by.get(v)
        test = f"{r['mean']:.3f}" + (f" ± {r['std']:.3f}" if r["std"] is not None else "") if r else "–"
        ci = f"{r['ci'][0]:.3f}–{r['ci'][1]:.3f}" if r and r.get("ci") else "–"
        secs = f"{r['train_s']:.1f} s" if r and r.get("train_s") is not None else "–"
        lines.append(f"| {v} | {'; '.join(grid) or '–'} | {s['selected'] or '–'} | {test} | {ci} | "
                     f"{r['ci_method'] if r else '–'} | {secs} |")
    warns = [f"- **{r['variant']}**: {r['edge']}" for r in rows if r["edge"]]
    if warns:
        lines += ["", "Warnings:", *warns]
    lines += ["", "## Recommendation", "", rec["text"], ""]
    return "\n".join(lines)


def _pareto_with_ci(out: Path, rep: dict, rows: list[dict]) -> None:
    from peftkit.report.table import plot

    half = {r["variant"]: (r["ci"][1] - r["ci"][0]) / 2 for r in rows if r.get("ci")}
    aggs = [{**a, "metric_std": half.get(a["variant"], a.get("metric_std"))} for a in rep["variants"]]
    cpu = bool(aggs) and aggs[0]["measured_method"] != "cuda"
    label = "peak memory (MiB, measured live peak)" if cpu else "peak memory (MiB, max allocated)"  # as report.py
    plot(aggs, "peak_bytes", label, out / "accuracy_vs_memory.png", True, 2**20)
    plot(aggs, "tokens_per_s", "throughput (training tokens/s)", out / "accuracy_vs_speed.png", False)


def render(out: str | Path, echo=print) -> dict | None:
    """Add the search to report.json / report.md of ``out`` (after report.report wrote them)."""
    out = Path(out)
    try:
        state = json.loads((out / "search.json").read_text())
        rep = json.loads((out / "report.json").read_text())
    except (OSError, ValueError):
        return None
    rows = _variants(out, rep, state)
    rec = recommend(rows)
    plot_grid(state, out / "search_validation.png")
    _pareto_with_ci(out, rep, rows)
    clean = [{k: v for k, v in r.items() if k != "boot"} for r in rows]
    rep["search"] = {**state, "test": clean}
    rep["recommendation"] = rec
    atomic_write_json(out / "report.json", rep)
    md = markdown(state, clean, rec)
    atomic_write_text(out / "report.md", (out / "report.md").read_text() + md)
    echo(md)
    return rep
