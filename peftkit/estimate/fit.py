"""Will it fit? Per strategy (or compare variant): the largest batch and the longest sequence
whose estimated peak fits a memory budget, found by bisection over ``estimate``; a verdict
(fits / tight / does not fit) from the allocated and reserved peaks with a stated margin, the
cheapest change that fits, and the micro-batch ``train.micro_batch_size: auto`` trains with.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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


def fit(recipe, budget: int | None, device: str, batch: int | None = None, seq: int | None = None,
        context: bool = True) -> dict:
    """One row: the peak at the recipe's shape; with a budget, its verdict, the largest batch
    (at its seq) and longest seq (at its batch) that "fit", and for "does not fit" the
    cheapest change that does."""
    from peftkit.estimate.trace import Estimator

    batch, seq = batch or recipe.train.batch_size, seq or recipe.task.max_length
    cache: dict[tuple, dict] = {}
    est = Estimator(recipe, device)

    def at(b: int, s: int) -> dict:
        if (b, s) not in cache:
            cache[(b, s)] = est.at(b, s)
        return cache[(b, s)]

    def need(b: int, s: int) -> int:  # what "fits" compares with the budget (reserved, context, margin)
        v = verdict(at(b, s), budget, context)
        return int(v["reserved_bytes"] * (1 + MARGIN))

    e = at(batch, seq)
    row = {"peak_bytes": e.get("device_total_bytes", e["peak_bytes"]), "batch_size": batch, "seq_len": seq}
    if "reserved_total_bytes" in e:
        row["reserved_bytes"] = e["reserved_total_bytes"]
    if budget is None:
        return row
    c = est.config
    cap_seq = getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None) or 131072
    v = verdict(e, budget, context)
    row.update({"verdict": v["verdict"], "fits": v["verdict"] == "fits", "margin": MARGIN,
                "max_batch": _largest(lambda b: need(b, seq), budget, batch, 1, MAX_BATCH),
                "max_seq": _largest(lambda s: need(batch, s), budget, seq, 8, cap_seq, step=8)})
    if v["verdict"] == "does not fit":
        row["change"] = cheapest_change(recipe, budget, device, batch, seq, context, est)
    row["estimates"] = len(cache)
    return row


# -- the verdict ------------------------------------------------------------------------------
# The whole-step estimate was within +-3.5% of max_memory_allocated on an H200 (1B, 8B): a 5%
# margin on each side of the budget keeps a "fits" clear of that error.
MARGIN = 0.05
VERDICTS = ("fits", "tight", "does not fit")


def verdict(est: dict, budget: int, context: bool = True, margin: float = MARGIN) -> dict:
    """fits: the predicted RESERVED peak (allocator segments) plus the margin fits the budget;
    does not fit: even the allocated peak less the margin is over it; tight: in between (the
    tensors fit, the allocator must release its cache under pressure: fragmentation decides).
    ``context``: the budget is a whole card (the CUDA context counts); False: an allocator cap
    (``set_per_process_memory_fraction``, which leaves the context out)."""
    ctx = est.get("context_bytes", 0) if context else 0
    alloc = est["peak_bytes"] + ctx
    reserved = max(est.get("reserved_peak_bytes", est["peak_bytes"]), est["peak_bytes"]) + ctx
    if alloc * (1 - margin) > budget:
        v = "does not fit"
    elif reserved * (1 + margin) <= budget:
        v = "fits"
    else:
        v = "tight"
    return {"verdict": v, "budget_bytes": budget, "allocated_bytes": alloc, "reserved_bytes": reserved,
            "margin": margin, "context_counted": bool(ctx)}


def candidates(recipe) -> list[tuple[str, list[str]]]:
    """Changes that lower the peak, cheapest first (what each costs: speed or numerics), each
    as dotted overrides; only what the recipe's schema offers and does not already do."""
    tc, mc, out = recipe.train, recipe.model, []
    if recipe.task.kind == "causal_lm" and not getattr(recipe.task, "loss_chunk_tokens", None):
        out.append(("chunked loss (no batch x seq x vocab logits; ~free)", ["task.loss_chunk_tokens=1024"]))
    if tc.optimizer not in ("adamw8bit", "paged_adamw8bit"):
        out.append(("8-bit AdamW state (bitsandbytes)", ["train.optimizer=adamw8bit"]))
    if not mc.gradient_checkpointing:
        out.append(("gradient checkpointing (~+30% compute)", ["model.gradient_checkpointing=true"]))
    if not tc.activation_offloading:
        out.append(("activation offloading to host (PCIe traffic)", ["train.activation_offloading=true"]))
    if not mc.gradient_checkpointing and recipe.task.kind == "causal_lm" and not recipe.task.loss_chunk_tokens:
        out.append(("gradient checkpointing + chunked loss",
                    ["model.gradient_checkpointing=true", "task.loss_chunk_tokens=1024"]))
    return out


def _with(recipe, overrides: list[str]):
    from peftkit import recipe as R

    return R.from_dict(R.apply_overrides(recipe.to_dict(), overrides), "candidate")


def cheapest_change(recipe, budget: int, device: str, batch: int, seq: int, context: bool = True,
                    estimator=None) -> dict | None:
    """The first change that fits by re-estimating: a smaller micro-batch with accumulation
    (the same optimisation), then each of ``candidates`` (with the largest micro-batch it
    allows); None if none does."""
    from peftkit.estimate.trace import Estimator

    def best(est, overrides: list[str], what: str) -> dict | None:
        m = _largest_power(lambda b: verdict(est.at(b, seq, accum=batch // b), budget, context)["verdict"] == "fits",
                           batch)
        if m is None:
            return None
        if m < batch:
            overrides = [*overrides, f"train.micro_batch_size={m}"]
            what += f"{' + ' if what else ''}micro-batch {m} with {batch // m}-step accumulation"
        return {"change": what, "overrides": overrides, **verdict(est.at(m, seq, accum=batch // m), budget, context)}

    found = best(estimator or Estimator(recipe, device), [], "")
    if found:
        found["change"] += " (same optimisation, slower)"
        return found
    for what, overrides in candidates(recipe):
        try:
            est = Estimator(_with(recipe, overrides), device)
        except Exception:  # noqa: BLE001 - a candidate this recipe cannot take (e.g. no bitsandbytes)
            continue
        if found := best(est, overrides, what):
            return found
    return None


# -- the micro-batch ----------------------------------------------------------------------------
def _largest_power(ok, batch: int) -> int | None:
    """Largest power of two dividing ``batch`` with ok(m) (ok monotone: true below, false above)."""
    powers = [2**k for k in range(batch.bit_length()) if batch % 2**k == 0]
    lo, hi, best = 0, len(powers) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        if ok(powers[mid]):
            best, lo = powers[mid], mid + 1
        else:
            hi = mid - 1
    return best


@dataclass(frozen=True)
class MicroBatchChoice:
    micro: int  # examples per forward/backward, per process
    accum: int  # micro-batches per optimizer step
    why: str
    world: int = 1
    device_bytes: int | None = None
    verdict: dict | None = None

    def train_update(self) -> dict:
        """What the trainer's ``train`` section becomes: its batch_size is the global micro-batch."""
        return {"batch_size": self.micro * self.world, "grad_accum": self.accum, "micro_batch_size": None}

    def line(self) -> str:
        return f"micro-batch {self.micro} x {self.accum} accumulation x {self.world} process(es): {self.why}"

    def as_dict(self) -> dict:
        return {"micro_batch_size": self.micro, "grad_accum": self.accum, "world_size": self.world,
                "global_batch": self.micro * self.accum * self.world, "why": self.why,
                "device_bytes": self.device_bytes, "verdict": self.verdict}


@dataclass(frozen=True)
class Capacity:
    bytes: int
    context: bool  # whether the CUDA context comes out of it (a whole card) or not (CPU, a capped allocator)
    source: str
    device: str = "cuda"


def device_capacity() -> Capacity:
    """What the device this process trains on can hold: the card's memory (times the
    per-process fraction when one is set), else the host's available memory."""
    import torch

    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        frac = getattr(torch.cuda, "get_per_process_memory_fraction", lambda *_: 1.0)()
        if frac < 1.0:
            return Capacity(int(total * frac), False, f"{frac:.3f} x {torch.cuda.get_device_name()} (memory fraction)")
        return Capacity(total, True, torch.cuda.get_device_name())
    import psutil

    return Capacity(psutil.virtual_memory().available, False, "host memory available now", "cpu")


def choose_micro_batch(recipe, capacity: Capacity, world: int = 1, seq: int | None = None, estimator=None,
                       task=None, tokenizer=None) -> MicroBatchChoice:
    """The largest power-of-two micro-batch whose estimated step is a "fits" on ``capacity``
    (by the estimate, no trial OOMs); the global ``train.batch_size`` comes from accumulation."""
    from peftkit.estimate.trace import Estimator

    tc = recipe.train
    if tc.batch_size % world:
        raise UserError(f"train.batch_size: {tc.batch_size} is not divisible by the {world} processes")
    per = tc.batch_size // world
    seq = seq or recipe.task.max_length
    if isinstance(tc.micro_batch_size, int):
        if per % tc.micro_batch_size:
            raise UserError(f"train.micro_batch_size: {tc.micro_batch_size} does not divide the per-process "
                            f"batch {per} (train.batch_size {tc.batch_size} over {world} processes)")
        m = tc.micro_batch_size
        return MicroBatchChoice(m, per // m, "train.micro_batch_size set in the recipe", world, capacity.bytes)
    est = estimator or Estimator(recipe, capacity.device, task, tokenizer)
    seen: dict[int, dict] = {}

    def ok(m: int) -> bool:
        seen[m] = verdict(est.at(m, seq, accum=per // m), capacity.bytes, capacity.context)
        return seen[m]["verdict"] == "fits"

    m = _largest_power(ok, per)
    if m is None:
        raise UserError(f"train.micro_batch_size: auto: even a micro-batch of 1 x {seq} tokens is estimated not "
                        f"to fit {capacity.bytes / 2**30:.2f} GiB ({capacity.source}); see "
                        f"`peftkit estimate --fit {capacity.bytes / 2**30:.0f}GiB` for what would")
    nxt = 2 * m
    why = (f"largest power of two dividing {per} whose estimated step fits {capacity.bytes / 2**30:.2f} GiB "
           f"({capacity.source}) with {MARGIN:.0%} margin: reserved {seen[m]['reserved_bytes'] / 2**30:.2f} GiB"
           + (f"; {nxt} is '{seen[nxt]['verdict']}'" if nxt in seen else ""))
    return MicroBatchChoice(m, per // m, why, world, capacity.bytes, seen[m])


def resolve_micro_batch(recipe, world: int = 1, capacity: Capacity | None = None, task=None,
                        tokenizer=None) -> MicroBatchChoice | None:
    """For the trainer, before it builds its Accelerator: None when the recipe sets no
    ``train.micro_batch_size``; else the choice (``train_update()`` is the train section to run)."""
    if recipe.train.micro_batch_size is None:
        return None
    return choose_micro_batch(recipe, capacity or device_capacity(), world, task=task, tokenizer=tokenizer)
