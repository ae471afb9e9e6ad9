"""Model FLOPs of training, counted per call, and MFU: those FLOPs per second over the
device's measured matmul peak (``matmul_peak_flops``).

Useful model FLOPs, PaLM-style: the matmuls a training step needs on the REAL tokens of the
batch (padding is not useful work), whatever the strategy. Forward hooks on every matmul
layer (``nn.Linear``, which bitsandbytes' 4/8-bit linears and peft's LoRA A/B are, and
GPT-2's ``Conv1D``) add, per call on ``rows`` input rows:

* forward ``2 · rows · in · out``; the weight gradient the same again if the weight trains;
  the input gradient the same again if the input requires grad. So everything below the
  lowest trainable parameter costs forward only (LoRA's frozen first projections, ``freeze``'s
  frozen blocks), and extra matmuls of a strategy (LoRA A/B, adapters, a prefix MLP) count
  as they run.
* rows: a layer that runs on every position (batch × padded length rows) counts the real
  tokens; one that runs on one row per sample (a pooled classification head) counts the
  samples; any other row count (an encoder-decoder's decoder) counts as executed.

Attention scores QKᵀ and the weighted sum AV are matmuls without weights: per self-attention
call ``2 · pairs · d`` each forward (d = heads × head dim), and in backward the same again
for each operand that requires grad (dQ, dK for QKᵀ; dA, dV for AV). ``pairs`` = query-key
pairs of real tokens: Σ len² (encoders), Σ len·(len+1)/2 (causal: keys at or before the
query), plus prefix tokens × tokens. Not counted: embeddings (lookups), norms, softmax,
elementwise scaling (IA3), dequantization, the optimizer, and recomputation by gradient
checkpointing (only calls inside the model's own training forward count). Encoder-decoder
attention (T5) is not counted; its linears are.

On unpadded batches with eager attention this equals ``torch.utils.flop_counter`` (what
really executes) except for causal attention, where that counts the masked half too.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from peftkit import arch
from peftkit.step.measure import sync


def _matmul_dims(m: nn.Module) -> tuple[int, int] | None:
    """(in, out) of a matmul layer, None for other modules."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    if isinstance(m, Conv1D):  # weight (in, out)
        return m.weight.shape[0], m.nf
    return None


def _attn_width(config) -> int:
    """Query heads × head dim: the inner width of QKᵀ and AV."""
    heads = int(getattr(config, "num_attention_heads", 0) or getattr(config, "n_head", 0))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads * int(head_dim)


class FlopCounter:
    """Counts the model FLOPs of every training forward (+ its backward) of ``model``.

    ``take()`` returns the FLOPs since the last call (one device sync); ``close()`` removes
    the hooks. The hooks only do Python arithmetic on shapes: per-batch token statistics
    stay on the device until ``take()``. A forward's FLOPs are ``a·tokens + b·Σlen² +
    c·samples``; with ``reuse`` (default), once a forward has run every layer on per-token or
    per-sample rows, its (a, b, c) are kept and the per-layer hooks removed, so later steps
    cost two hooks and a few tensor ops (layers that run on other row counts keep counting
    per call).
    """

    def __init__(self, model: nn.Module, reuse: bool = True):
        self.linear = self.attention = 0.0  # totals by kind over all take() calls
        self.reuse = reuse
        self._pending: list[torch.Tensor] = []
        self._on = False
        self._fixed: dict | None = None  # kept coefficients (reuse)
        self._top = [model.register_forward_pre_hook(self._begin, with_kwargs=True),
                     model.register_forward_hook(self._end)]
        self._handles = []  # per-layer hooks
        for m in model.modules():
            if _matmul_dims(m) is not None:
                self._handles.append(m.register_forward_hook(self._linear))
        self._qkv: dict[int, dict[str, bool]] = {}
        cfg = arch.config_of(model)
        if cfg is not None and not getattr(cfg, "is_encoder_decoder", False):
            self._hook_attention(model, cfg)

    # -- hooks ------------------------------------------------------------------------------
    def _begin(self, module, args, kwargs):
        if not torch.is_grad_enabled():
            return
        x = kwargs.get("input_ids")
        x = kwargs.get("inputs_embeds") if x is None else x
        x = args[0] if x is None and args else x
        if not isinstance(x, torch.Tensor) or x.ndim < 2:
            return
        b, s = x.shape[:2]
        mask, pos = kwargs.get("attention_mask"), kwargs.get("position_ids")
        if isinstance(mask, torch.Tensor) and tuple(mask.shape) == (b, s):
            lens = mask.to(torch.float64).sum(1)
            tokens, sq = lens.sum(), (lens * lens).sum()
        elif isinstance(pos, torch.Tensor) and b == 1 and pos.numel() == s:
            # Padding-free: sequences concatenated, positions restart at 0. Position p is a
            # query with p + 1 causal keys: Σ(p+1) = Σ len(len+1)/2, Σ(2p+1) = Σ len².
            p = pos.reshape(-1).to(torch.float64)
            tokens, sq = torch.tensor(float(s), dtype=torch.float64, device=p.device), (2 * p + 1).sum()
        else:
            tokens, sq = torch.tensor(float(b * s), dtype=torch.float64), torch.tensor(float(b * s * s), dtype=torch.float64)
        self._b, self._bs, self._tokens, self._sq = b, b * s, tokens, sq
        # FLOPs of this forward, by kind = tok·tokens + sq·Σlen² + row·samples + other
        self._c = self._fixed or {k: {"tok": 0.0, "sq": 0.0, "row": 0.0, "other": 0.0} for k in ("linear", "attention")}
        self._on = True

    def _end(self, module, args, out):
        if not self._on:
            return
        self._on = False
        self._pending.append(torch.stack([c["tok"] * self._tokens + c["sq"] * self._sq + (c["row"] * self._b + c["other"])
                                          for c in self._c.values()]))
        if (self.reuse and self._fixed is None and self._bs != self._b
                and not any(c["other"] for c in self._c.values())):
            self._fixed = self._c
            self._remove(self._handles)

    def _linear(self, mod, args, out):
        if not self._on or not args or not isinstance(args[0], torch.Tensor):
            return
        x = args[0]
        i, o = _matmul_dims(mod)
        rows = x.numel() // i
        f = 2.0 * i * o * (1 + int(mod.weight.requires_grad) + int(x.requires_grad))
        c = self._c["linear"]
        if rows == self._bs:
            c["tok"] += f
        elif rows == self._b:
            c["row"] += f
        else:
            c["other"] += f * rows

    def _hook_attention(self, model, cfg):
        """Self-attention modules found by type (peftkit.arch roles); q/k/v output hooks tell
        which operands need gradients. Unknown architectures: per block, causal as
        ``arch.kind`` says, else as the block's attention module says (``is_causal``)."""
        from peftkit.errors import UserError

        kind = arch.kind(cfg)
        causal = kind == "decoder"
        try:
            roles = {r: arch.linears(model, r) for r in ("q", "k", "v")}
        except UserError:
            roles = {}
        parents = {id(p): p for found in roles.values() for _, p, _ in found}
        if parents:
            for role, found in roles.items():
                for _, parent, attr in found:
                    self._handles.append(getattr(parent, attr).register_forward_hook(self._qkv_hook(id(parent), role)))
            for parent in parents.values():
                c = getattr(parent, "is_causal", causal)
                self._handles.append(parent.register_forward_hook(self._attn_hook(parent, _attn_width(parent.config),
                                                                                  bool(c), False)))
            return
        try:
            _, blocks = arch.find_blocks(model)
        except UserError:
            return
        for block in blocks:
            c = causal if kind else any(getattr(m, "is_causal", False) is True for m in block.modules())
            self._handles.append(block.register_forward_hook(self._attn_hook(block, _attn_width(cfg), c, True),
                                                             with_kwargs=True))

    def _qkv_hook(self, key: int, role: str):
        def hook(mod, args, out):
            if self._on:
                o = out[0] if isinstance(out, tuple) else out
                self._qkv.setdefault(key, {})[role] = bool(getattr(o, "requires_grad", False))
        return hook

    def _attn_hook(self, module, d: int, causal: bool, block: bool):
        def hook(mod, args, *rest):
            if not self._on:
                return
            if block:  # fallback: every operand needs a gradient if anything at or below trains
                kwargs = rest[0]
                h = args[0] if args else kwargs.get("hidden_states")
                g = bool(getattr(h, "requires_grad", False)) or any(p.requires_grad for p in mod.parameters())
                nq = nk = nv = g
            else:
                flags = self._qkv.pop(id(mod), {})
                nq, nk, nv = flags.get("q", False), flags.get("k", False), flags.get("v", False)
            slot = getattr(mod, arch.PREFIX_SLOT, None)  # prefix tuning: trained keys/values before the real ones
            prefix = 0
            if slot is not None:
                prefix, trains = slot.tokens, slot.trains
                nk, nv = nk or trains, nv or trains
            units = 2 + nq + nk + (nq or nk) + nv  # QKᵀ, AV forward; dQ, dK, dA, dV
            f = 2.0 * d * units
            # pairs = Σ len² (or Σ len(len+1)/2 causal) + prefix · tokens
            c = self._c["attention"]
            c["sq"] += f * (0.5 if causal else 1.0)
            c["tok"] += f * ((0.5 if causal else 0.0) + prefix)

        return hook

    # -- results ----------------------------------------------------------------------------
    def take(self) -> float:
        """Model FLOPs of the training forwards/backwards since the last call."""
        if not self._pending:
            return 0.0
        dev = self._pending[0].device
        lin, att = torch.stack([t.to(dev) for t in self._pending]).sum(0).tolist()
        self._pending.clear()
        self.linear += lin
        self.attention += att
        return lin + att

    def close(self):
        self._remove(self._handles)
        self._remove(self._top)

    @staticmethod
    def _remove(handles):
        for h in handles:
            h.remove()
        handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# -- MFU ----------------------------------------------------------------------------------
def mfu(flops_per_s: float | None, peak_flops_per_s: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOPs/s over the device's (measured) peak."""
    if not flops_per_s or not peak_flops_per_s:
        return None
    return flops_per_s / peak_flops_per_s


def matmul_peak_flops(device: str = "cuda", dtype: torch.dtype = torch.bfloat16, n: int = 8192, iters: int = 50,
                      warmup: int = 5) -> float:
    """Measured dense matmul throughput (FLOPs/s): the denominator of MFU on this machine."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(warmup):
        torch.matmul(a, b, out=c)
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        torch.matmul(a, b, out=c)
    sync()
    return 2.0 * n**3 * iters / (time.perf_counter() - t0)
