"""The untrained reference row, forgetting per strategy, accuracy vs forgetting, the recommendation.

Read from result.json files: ``OUT/_untrained/eval/result.json`` (``peftkit.runs.reference``)
and each run's ``forgetting`` section (``peftkit.tasks.forgetting``; decoders only).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

REFERENCE_RESULT = Path("_untrained") / "eval" / "result.json"
# The recommendation's forgetting budget: a rise in LM loss on general text of at most this many
# nats per token (perplexity x1.05), judged at the upper end of its 95% interval.
FORGET_TOL = 0.05
RULE = (f"among the variants whose metric is above the untrained model's, those whose forgetting (rise in LM loss "
        f"on general text, upper end of its 95% interval) is at most {FORGET_TOL} nats/token (perplexity "
        f"+{100 * (math.exp(FORGET_TOL) - 1):.0f}%); of these the highest metric. If none forgets that little: "
        "the least forgetting among those above the untrained model.")


def reference(out: Path, primary) -> dict | None:
    """The untrained model's metric and LM loss on the forgetting sample (None: no reference run);
    ``primary(result) -> (name, value)`` reads its metric as every row's is read."""
    try:
        res = json.loads((out / REFERENCE_RESULT).read_text())
    except (OSError, ValueError):
        return None
    name, value = primary(res)
    f = res.get("forgetting") or {}
    return {"variant": "untrained", "metric_name": name, "metric": value, "lm_loss": f.get("loss_before"),
            "block_loss": f.get("block_loss_before"),
            "perplexity": f.get("perplexity_before"), "forgetting_data": f.get("data"),
            "eval": (res.get("metrics") or {}).get("eval")}


def run_fields(res: dict) -> dict:
    """A run's forgetting numbers for its report row (None where not measured)."""
    f = res.get("forgetting") or {}
    return {"forgetting": f.get("rise"), "forgetting_se": f.get("rise_se"), "lm_loss_after": f.get("loss_after"),
            "block_loss_after": f.get("block_loss_after"), "forgetting_basis": "run start" if "rise" in f else None}


def against_reference(rows: list[dict], ref: dict | None) -> None:
    """Forgetting measured from the untrained model rather than from the run's own start, where
    the reference has the same blocks: a strategy whose initial state already changes the model
    (prefix tuning's random prefixes) is judged against doing nothing, like every other."""
    from peftkit.tasks.forgetting import paired_rise

    base = (ref or {}).get("block_loss")
    for r in rows:
        after = r.get("block_loss_after")
        if base and after and len(after) == len(base):
            p = paired_rise(base, after)
            r.update(forgetting=p["rise"], forgetting_se=p["rise_se"], forgetting_basis="untrained model")


def aggregate(agg: dict, rows: list[dict]) -> None:
    agg["forgetting_basis"] = next((r["forgetting_basis"] for r in rows if r.get("forgetting_basis")), None)
    """Mean rise over a variant's seeds; its standard error combines the seeds' (independent) ones."""
    rs = [r for r in rows if isinstance(r.get("forgetting"), (int, float))]
    agg["forgetting"] = sum(r["forgetting"] for r in rs) / len(rs) if rs else None
    ses = [r["forgetting_se"] for r in rs if isinstance(r.get("forgetting_se"), (int, float))]
    agg["forgetting_se"] = math.sqrt(sum(s * s for s in ses)) / len(ses) if ses else None
    after = [r["lm_loss_after"] for r in rs if isinstance(r.get("lm_loss_after"), (int, float))]
    agg["lm_loss_after"] = sum(after) / len(after) if after else None


def mark(aggs: list[dict], ref: dict | None) -> None:
    """``below_untrained``: the variant's mean metric is below the untrained model's."""
    for a in aggs:
        below = ref is not None and ref["metric"] is not None and a["metric"] is not None and a["metric"] < ref["metric"]
        a["below_untrained"] = bool(below)


def upper(a: dict) -> float | None:
    if a.get("forgetting") is None:
        return None
    return a["forgetting"] + 1.96 * (a.get("forgetting_se") or 0.0)


def recommend(aggs: list[dict]) -> dict | None:
    """The stated rule (RULE) applied; None when forgetting was not measured."""
    cands = [a for a in aggs if a["metric"] is not None and a.get("forgetting") is not None and not a["below_untrained"]]
    if not cands:
        return None
    within = [a for a in cands if upper(a) <= FORGET_TOL]
    if within:
        best = max(within, key=lambda a: a["metric"])
        why = f"highest {best['metric_name']} with forgetting <= {FORGET_TOL} nats/token"
    else:
        best = min(cands, key=lambda a: a["forgetting"])
        why = f"no variant forgets <= {FORGET_TOL} nats/token: the least forgetting above the untrained model"
    return {"variant": best["variant"], "why": why, "rule": RULE}


def _fmt(a: dict) -> str:
    if a.get("forgetting") is None:
        return "–"
    se = a.get("forgetting_se")
    return f"{a['forgetting']:+.4f}" + ("" if se is None else f" ± {se:.4f}")


def markdown(aggs: list[dict], ref: dict | None, rec: dict | None) -> str:
    """report.md's section: the reference row, each variant vs it and its forgetting, the recommendation."""
    if ref is None and not any(a.get("forgetting") is not None for a in aggs):
        return ""
    metric = aggs[0]["metric_name"] if aggs else (ref or {}).get("metric_name", "metric")
    lines = ["", "## Untrained reference and forgetting", "",
             f"| Variant | {metric} | vs untrained | Forgetting (Δ LM loss, nats/token ± se) | LM loss after |",
             "|---|---|---|---|---|"]
    if ref is not None:
        m = "–" if ref["metric"] is None else f"{ref['metric']:.4f}"
        loss = "–" if ref["lm_loss"] is None else f"{ref['lm_loss']:.4f}"
        lines.append(f"| untrained (reference) | {m} | – | 0 (baseline) | {loss} |")
    for a in aggs:
        m = "–" if a["metric"] is None else f"{a['metric']:.4f}"
        vs = "–" if ref is None or ref["metric"] is None or a["metric"] is None else (
            f"{a['metric'] - ref['metric']:+.4f}" + (" **below untrained**" if a["below_untrained"] else ""))
        after = "–" if a.get("lm_loss_after") is None else f"{a['lm_loss_after']:.4f}"
        lines.append(f"| {a['variant']} | {m} | {vs} | {_fmt(a)} | {after} |")
    lines += ["", "- **untrained**: the model as loaded (no strategy trained, `train.max_steps: 0`), same evaluation; "
              "evaluated once per comparison.",
              "- **Forgetting**: rise of the LM loss on a fixed general-text sample "
              + (f"(`{ref['forgetting_data']}`) " if ref and ref.get("forgetting_data") else "")
              + "from the untrained model (the reference run; without one, from the run's own start) to after "
              "training (negative: better at it); ± bootstrap standard error over the sample's paired blocks. "
              "Decoders only.",
              "", "![accuracy vs forgetting](accuracy_vs_forgetting.png)" if any(
                  a.get("forgetting") is not None for a in aggs) else ""]
    if rec is not None:
        lines += ["", f"**Recommendation: {rec['variant']}** ({rec['why']}). Rule: {rec['rule']}"]
    return "\n".join(lines).rstrip() + "\n"


def plot(aggs: list[dict], ref: dict | None, path: Path) -> bool:
    from peftkit.report.table import plot as draw

    return draw(aggs, "forgetting", "forgetting (rise in LM loss on general text, nats/token)", path, True,
                xerr_key="forgetting_se", ref=ref)


def echo_lines(aggs: list[dict], ref: dict | None, rec: dict | None) -> list[str]:
    out = []
    if ref is not None and ref["metric"] is not None:
        out.append(f"untrained reference: {ref['metric_name']} {ref['metric']:.4f}")
    out += [f"below untrained: {a['variant']} ({a['metric']:.4f})" for a in aggs if a["below_untrained"]]
    out += [f"forgetting {a['variant']}: {_fmt(a)} nats/token" for a in aggs if a.get("forgetting") is not None]
    if rec is not None:
        out.append(f"recommendation: {rec['variant']} ({rec['why']})")
    return out
