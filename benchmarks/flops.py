"""Model FLOPs of training steps, counted live on the batches actually trained.

Convention (the one behind "6N per token"), per call of every ``nn.Linear`` (bitsandbytes'
4-bit/8-bit linears and peft's LoRA A/B are ``nn.Linear`` too) on ``rows`` input rows:

* forward: ``2 · rows · in · out``
* weight gradient: the same again if the weight trains
* input gradient: the same again if the input needs a gradient (``x.requires_grad``: some
  parameter below trains), so parts below the lowest trainable parameter cost forward only.

Full fine-tuning: 6N per token; frozen linears under a trainable layer (LoRA): ≈4N; the
task head runs on one row per sample (pooled), not per token, and is counted that way.
Attention score/value products, not linears, are added per layer: forward
``4 · B · s² · d`` (QKᵀ and AV over the padded length ``s``), backward twice that if anything
at or below that layer trains. Embedding lookups, norms, activations, softmax and the
optimizer are not counted (they are memory-bound; that is the usual MFU convention).

``peftkit.measure`` may get an equivalent per-token estimate for the GPU check (branch
``scale``); this module counts per call so that it is exact for dynamic padding and for
every strategy without knowing its internals.
"""

from __future__ import annotations

import torch
from torch import nn


def layer_stack(model: nn.Module) -> nn.ModuleList | None:
    """The transformer block list: the longest ModuleList whose children share one type."""
    best = None
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) > 1 and len({type(c) for c in m}) == 1:
            if best is None or len(m) > len(best):
                best = m
    return best


def _trains(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


class FlopCounter:
    """Forward hooks that add up model FLOPs (see module docstring) of training forwards."""

    def __init__(self, model: nn.Module, hidden_size: int | None = None):
        self.flops = 0.0
        self.linear = 0.0
        self.attention = 0.0
        self._handles = []
        cfg = getattr(model, "config", None)
        self.d = hidden_size or getattr(cfg, "hidden_size", None)
        for m in model.modules():
            if isinstance(m, nn.Linear):
                self._handles.append(m.register_forward_hook(self._linear))
        stack = layer_stack(model)
        if stack is not None and self.d:
            # Backward through layer i's attention is needed if anything at or below it trains.
            below = _trains_before(model, stack)
            for i, block in enumerate(stack):
                needs = below or any(_trains(b) for b in list(stack)[: i + 1])
                self._handles.append(block.register_forward_hook(self._attention(needs), with_kwargs=True))

    def _linear(self, mod, args, out):
        if not torch.is_grad_enabled():
            return
        x = args[0] if args else None
        if x is None:
            return
        rows = x.numel() // mod.in_features
        n = 2.0 * rows * mod.in_features * mod.out_features
        f = n * (1 + int(mod.weight.requires_grad) + int(x.requires_grad))
        self.linear += f
        self.flops += f

    def _attention(self, needs_grad: bool):
        def hook(mod, args, kwargs, out):
            if not torch.is_grad_enabled():
                return
            h = args[0] if args else kwargs.get("hidden_states")
            if h is None or h.ndim != 3:
                return
            b, s, _ = h.shape
            f = 4.0 * b * s * s * self.d * (3 if needs_grad else 1)
            self.attention += f
            self.flops += f

        return hook

    def take(self) -> float:
        """FLOPs since the last call."""
        f, self.flops = self.flops, 0.0
        return f

    def close(self):
        for h in self._handles:
            h.remove()


def _trains_before(model: nn.Module, stack: nn.ModuleList) -> bool:
    """Whether a parameter outside the stack and before it (embeddings) trains."""
    first = next(iter(stack.parameters()), None)
    for p in model.parameters():
        if p is first:
            return False
        if p.requires_grad:
            return True
    return False


def matmul_peak(dtype: torch.dtype, sizes=(1024, 2048, 4096), repeats: int = 5) -> dict:
    """Best FLOP/s of ``torch.matmul`` on large squares of ``dtype`` (best of ``repeats``)."""
    import time

    best, per = 0.0, {}
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        torch.matmul(a, b)  # warm-up (packing, thread pool)
        top = 0.0
        for _ in range(repeats):
            t = time.perf_counter()
            torch.matmul(a, b)
            dt = time.perf_counter() - t
            top = max(top, 2.0 * n**3 / dt)
        per[n] = top
        best = max(best, top)
    return {"dtype": str(dtype).removeprefix("torch."), "flops_per_s": best, "by_size": per, "repeats": repeats}
