"""Stand-ins the estimate traces where real kernels cannot run on fake tensors.

* quantized linears: packed weights + bitsandbytes' quant state, and the allocations that
  bitsandbytes 0.50's autograd functions make per call (``MatMul4Bit``: fused gemm forward,
  nothing saved, a dequantized weight in backward; ``MatMul8bitFp``, its CPU/XPU training
  path: a dequantized weight in forward and backward, the input held for backward);
* CUDA as the target: attention as FlashAttention-2 / SDPA's memory-efficient kernels keep
  it (output + fp32 log-sum-exp per row saved; backward: dq/dk/dv and an fp32 dq accumulator,
  GQA keys/values expanded to the query heads), every block rounded to the caching
  allocator's 512 B; the fixed CUDA costs and the allocator's segments are in ``cuda.py``.
"""

from __future__ import annotations

import math
import types

import torch

BLOCK = 64  # bitsandbytes 4-bit block size
BLOCK_ROUND = 512  # CUDA caching allocator: every block is a multiple of 512 B
PAGED_MIN_NUMEL = 100_000  # bitsandbytes pages state buffers of tensors at least this large


def quantized_linears(model, skip: list[str]) -> list[tuple[str, torch.nn.Linear]]:
    """The linears transformers' bitsandbytes quantizer would convert (head and skip list kept)."""
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    patterns = list(skip) if skip else get_keys_to_not_convert(model)
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and should_convert_module(n, patterns)]


class _Dequantizing(torch.autograd.Function):
    """y = x W^T with W held quantized; ``hold_input``: 8-bit keeps x on ctx (MatMul8bitFp)."""

    @staticmethod
    def forward(ctx, x, w, shape, qdtype, hold_input):
        ctx.shape, ctx.qdtype, ctx.w = shape, qdtype, w
        if hold_input:
            ctx.x = x
            weight = torch.empty(shape, dtype=x.dtype, device=x.device)
            return torch.nn.functional.linear(x, weight)
        return x.new_empty((*x.shape[:-1], shape[0]))  # fused 4-bit gemm: output only

    @staticmethod
    def backward(ctx, g):
        weight = torch.empty(ctx.shape, dtype=ctx.qdtype, device=g.device).to(g.dtype)
        return g @ weight, None, None, None, None


def _quant_state(numel: int, shape, dtype, double: bool, dynamic_code):
    blocks = math.ceil(numel / BLOCK)
    qs = types.SimpleNamespace(quant_type="nf4", shape=torch.Size(shape), dtype=dtype, blocksize=BLOCK,
                               code=torch.empty(16), nested=double, state2=None, offset=None)
    if double:
        qs.absmax = torch.empty(blocks, dtype=torch.uint8)
        qs.offset = torch.empty(())
        qs.state2 = types.SimpleNamespace(absmax=torch.empty(math.ceil(blocks / 256)), code=dynamic_code,
                                          offset=None, state2=None)
    else:
        qs.absmax = torch.empty(blocks)
    return qs


def quantize(qlinears, mc) -> None:
    """Swap each fake linear's weight for its 4-/8-bit storage and patch its forward."""
    from peftkit.model.backbone import DTYPES

    cdt = DTYPES[mc.compute_dtype]
    four = mc.quantization == "4bit"
    code = torch.empty(256)  # bitsandbytes' dynamic map, shared by every nested state
    for _, m in qlinears:
        w = m.weight
        shape, dtype = tuple(w.shape), w.dtype
        if four:
            p = torch.nn.Parameter(torch.empty(((w.numel() + 1) // 2, 1), dtype=torch.uint8), requires_grad=False)
            p.quant_state = _quant_state(w.numel(), shape, dtype, mc.double_quant, code)
            if m.bias is not None:  # cast to the compute dtype on the first forward
                m.bias = torch.nn.Parameter(m.bias.detach().to(cdt), requires_grad=m.bias.requires_grad)
        else:
            p = torch.nn.Parameter(torch.empty(shape, dtype=torch.int8), requires_grad=False)
            p.SCB = torch.empty(shape[0])
        m.weight = p
        m.forward = types.MethodType(_forward(shape, dtype, cdt if four else None), m)


def _forward(shape, qdtype, compute_dtype):
    def forward(self, x):
        dt = x.dtype
        h = x.to(compute_dtype) if compute_dtype is not None else x
        y = _Dequantizing.apply(h, self.weight, shape, qdtype, compute_dtype is None)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(dt)

    return forward


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v):  # (b, h, s, d); keys/values may have fewer heads (GQA)
        out = q.new_empty(q.shape[0], q.shape[2], q.shape[1], q.shape[3])  # (b, s, h, d)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, g):
        q, k, v, out, lse = ctx.saved_tensors
        dq_accum = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        dq = torch.empty_like(q)
        if k.shape[1] != q.shape[1]:  # GQA: gradients at query heads, then summed per group
            dk_full, dv_full = torch.empty_like(q), torch.empty_like(q)
            del dk_full, dv_full
        del dq_accum
        return dq, torch.empty_like(k), torch.empty_like(v)


def _flash_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    return _FlashAttention.apply(query, key, value), None


def _no_mask(*args, **kwargs):
    return None  # causal, unpadded: the kernel masks by position, no (b, 1, q, k) tensor


def flash_attention_name() -> str:
    """Register the CUDA attention stand-in with transformers (once) and return its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    name = "peftkit_cuda_fused"  # no "flash" in it: transformers would look for the package
    AttentionInterface.register(name, _flash_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, _no_mask)
    return name


def paged_bytes(opt) -> int:
    """State of a paged bitsandbytes optimizer that lives in cudaMallocManaged buffers: outside
    PyTorch's allocator, so not in max_memory_allocated (smaller tensors stay ordinary)."""
    inner = getattr(opt, "optimizer", opt)
    if not getattr(inner, "is_paged", False):
        return 0
    return sum(t.untyped_storage().nbytes() for p, st in inner.state.items() if p.numel() >= PAGED_MIN_NUMEL
               for k, t in st.items() if k in ("state1", "state2") and isinstance(t, torch.Tensor))


def allowances(target: str, est: dict) -> dict:
    """What a CUDA target adds to the traced peak, each a named line (``cuda.fixed_costs``):
    the cuBLAS/cuBLASLt workspaces come from the caching allocator, so they are part of
    ``peak_bytes`` (max_memory_allocated's counterpart) and of the reserved peak; the CUDA
    context is outside both and only added to the device totals. CPU: nothing."""
    if target != "cuda":
        return {}
    from peftkit.estimate import cuda

    lines = cuda.fixed_costs()
    inside = sum(c["bytes"] for c in lines if c["in_allocated"])
    context = sum(c["bytes"] for c in lines if not c["in_allocated"])
    peak = est["peak_bytes"] + inside
    reserved = max(est.get("reserved_peak_bytes", 0), peak)  # the replay already holds the workspaces
    return {"peak_bytes": peak, "total_bytes": peak, "traced_peak_bytes": est["peak_bytes"],
            "at_peak": {**est["at_peak"], "cuda_workspaces": inside}, "cuda_fixed": lines,
            "context_bytes": context, "context_note": cuda.CONTEXT_NOTE, "block_rounding_bytes": BLOCK_ROUND,
            "reserved_peak_bytes": reserved, "device_total_bytes": peak + context,
            "reserved_total_bytes": reserved + context}
