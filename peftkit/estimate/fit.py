"""Will it fit? Per strategy (or compare variant): the largest batch and the longest sequence
whose estimated peak fits a memory budget, found by bisection over ``estimate``.
"""

from __future__ import annotations

import re

from peftkit.errors import UserError

UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
         "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
MAX_BATCH = 4096


def parse_bytes(text: str) -> int:
    """'24GiB' -> 25769803776; '80GB' -> 8e10 (decimal units are decimal)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in UNITS:
        raise UserError(f"--fit: cannot read '{text}' as a size (e.g. 24GiB, 80GB, 512MiB)")
    return int(float(m.group(1)) * UNITS[m.group(2).lower()])


def _largest(peak, budget: int, start: int, lo: int, cap: int, step: int = 1) -> int | None:
    """Largest x (a multiple of ``step``) in [lo, cap] with peak(x) <= budget, peak monotone.

    Bracketed by doubling/halving from ``start``, then refined by interpolation (the peak is
    close to affine in batch and sequence length) with a bisection fallback. None: lo fails.
    """
    snap = lambda x: max(lo, min(cap, int(x) // step * step))  # noqa: E731
    good, bad, x = None, None, snap(start)
    while good is None or bad is None:
        if peak(x) <= budget:
            good = x
            if x >= cap:
                return cap
            x = snap(2 * x)
        else:
            bad = x
            if x <= lo:
                return None
            x = snap(x // 2)
    while bad - good > step:
        pg, pb = peak(good), peak(bad)
        x = snap(good + (budget - pg) * (bad - good) / max(pb - pg, 1))
        if not good < x < bad:
            x = snap((good + bad) // 2)
        if not good < x < bad:
            break
        if peak(x) <= budget:
            good = x
            if x + step < bad and peak(x + step) > budget:
                return x
        else:
            bad = x
    return good


def fit(recipe, budget: int | None, device: str, batch: int | None = None, seq: int | None = None) -> dict:
    """One row: the peak at the recipe's shape; with a budget, its largest batch (at its seq)
    and longest seq (at its batch)."""
    from peftkit.estimate.trace import Estimator

    batch, seq = batch or recipe.train.batch_size, seq or recipe.task.max_length
    cache: dict[tuple, int] = {}
    est = Estimator(recipe, device)

    def peak(b: int, s: int) -> int:
        if (b, s) not in cache:
            e = est.at(b, s)
            cache[(b, s)] = e.get("device_total_bytes", e["peak_bytes"])
        return cache[(b, s)]

    row = {"peak_bytes": peak(batch, seq), "batch_size": batch, "seq_len": seq}
    if budget is None:
        return row
    c = est.config
    cap_seq = getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None) or 131072
    return {**row, "fits": row["peak_bytes"] <= budget,
            "max_batch": _largest(lambda b: peak(b, seq), budget, batch, 1, MAX_BATCH),
            "max_seq": _largest(lambda s: peak(batch, s), budget, seq, 8, cap_seq, step=8), "estimates": len(cache)}
