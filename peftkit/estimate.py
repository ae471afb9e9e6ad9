"""Training-memory estimate before any weight is loaded.

The model is built from its config alone on *fake* tensors (``FakeTensorMode``: shapes and
dtypes, no storage), the strategy is applied to it exactly as in training, and one forward
pass with a fake batch of the recipe's size runs under the recipe's autocast while
``saved_tensors_hooks`` record what autograd would keep for backward. So:

* weights     = sum over parameter/buffer storages of numel x element size; 4-bit layers at
                numel/2 bytes plus bitsandbytes' quant state (absmax per 64-block: uint8 with
                double quantization + fp32 per 256 blocks, else fp32; code; offset)
* gradients   = trainable params x param element size (fp32 master weights under autocast)
* optimizer   = AdamW: 2 x trainable params x element size + 4 bytes per trainable tensor (step)
* activations = unique storages saved for backward by one forward of (batch, seq) tokens,
                parameters excluded, autocast's low-precision copies included

4-bit linears are traced as bitsandbytes' CPU path behaves: input cast to the compute dtype,
nothing saved for backward (the packed weight is held on the autograd context).
Nothing here models allocator overhead or backward-pass temporaries (gradients of
activations), which the measured peak includes.
"""

from __future__ import annotations

import math
import time
import types

import torch

from . import backbone, hardware, strategies, tasks
from .errors import UserError

BLOCK = 64  # bitsandbytes 4-bit block size


def _sid(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def quant4_bytes(numel: int, double_quant: bool) -> tuple[int, int]:
    """(packed weight bytes, quant-state bytes) of one 4-bit weight."""
    blocks = math.ceil(numel / BLOCK)
    if double_quant:
        state = blocks + math.ceil(blocks / 256) * 4 + 256 * 4 + 4 + 16 * 4  # absmax u8, state2, offset, code
    else:
        state = blocks * 4 + 16 * 4
    return (numel + 1) // 2, state


class _NoSaveLinear(torch.autograd.Function):
    """Shape stand-in of bitsandbytes MatMul4Bit: nothing goes through save_for_backward."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.w = w
        return torch.nn.functional.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype))

    @staticmethod
    def backward(ctx, g):
        return g @ ctx.w.to(g.dtype), None, None


def _as_4bit(module: torch.nn.Linear, compute_dtype: torch.dtype):
    def forward(self, x):
        return _NoSaveLinear.apply(x.to(compute_dtype), self.weight, self.bias).to(x.dtype)

    module.forward = types.MethodType(forward, module)


def _quantized_linears(model, skip: list[str]) -> list[tuple[str, torch.nn.Linear]]:
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    patterns = list(skip) if skip else get_keys_to_not_convert(model)
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and should_convert_module(n, patterns)]


def _fake_batch(auto_name: str, batch: int, seq: int) -> dict:
    ids = torch.zeros(batch, seq, dtype=torch.long)
    labels = torch.zeros(batch, dtype=torch.long) if "SequenceClassification" in auto_name else ids.clone()
    return {"input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.long), "labels": labels}


def estimate(recipe, batch_size: int | None = None, seq_len: int | None = None,
             seq_source: str | None = None, device: str | None = None, task=None, tokenizer=None) -> dict:
    """Memory of training ``recipe`` per component, predicted from config and shapes only."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import AutoConfig

    t0 = time.perf_counter()
    recipe = hardware.pinned(recipe)  # precision/compute_dtype auto: what this machine runs
    mc, tc = recipe.model, recipe.train
    batch = batch_size or tc.batch_size
    seq = seq_len or recipe.task.max_length
    src = seq_source or ("given" if seq_len else "task.max_length (upper bound: every batch padded to it)")
    tok = tokenizer or backbone.load_tokenizer(mc)
    task = task or tasks.get(recipe.task, tok)
    path = backbone.resolve(mc.name)
    try:
        config = AutoConfig.from_pretrained(path, revision=mc.revision, trust_remote_code=mc.trust_remote_code,
                                            **task.model_kwargs())
    except (OSError, ValueError) as e:
        raise UserError(f"model.name: cannot read the config of '{mc.name}': {str(e).splitlines()[0]}") from None
    if getattr(config, "pad_token_id", None) is None and tok.pad_token_id is not None:
        config.pad_token_id = tok.pad_token_id
    dtype = backbone.DTYPES[mc.dtype]
    quant = mc.quantization or "none"
    cdt = backbone.DTYPES[mc.compute_dtype]
    attn = backbone.attention_impl(mc.attn_implementation, dtype if quant == "none" else cdt)
    auto = task.auto_class()
    strategy = strategies.get(recipe.strategy)

    # Built and adapted on the meta device (peft moves modules, which fake tensors refuse),
    # then every parameter/buffer becomes a fake CPU tensor for the trace (ties kept).
    with torch.device("meta"):
        model = auto.from_config(config, dtype=dtype, attn_implementation=attn,
                                 trust_remote_code=mc.trust_remote_code)
        qlinears = _quantized_linears(model, list(task.head_names)) if quant != "none" else []
        for _, m in qlinears:
            _as_4bit(m, cdt)  # 8-bit saves nothing either (weight held on ctx)
        if mc.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        head = task.head(model)
        model = strategy.apply(model, head)
    model.train()
    with FakeTensorMode(allow_non_fake_inputs=True):
        qweights = [m.weight for _, m in qlinears]
        # bitsandbytes casts a 4-bit layer's bias to the compute dtype on its first forward.
        qbiases = [m.bias for _, m in qlinears if m.bias is not None and quant == "4bit"]
        fake = _to_fake(model)
        parts = _static_parts(model, {id(fake[id(w)]) for w in qweights}, quant, mc.double_quant,
                              {id(fake[id(b)]) for b in qbiases}, cdt)
        acts = _activations(model, auto.__name__, batch, seq, tc.precision)

    comps = {
        "weights": parts["weights"],
        "gradients": parts["gradients"],
        "optimizer": parts["optimizer"],
        "activations": acts,
    }
    total = sum(c["total_bytes"] for c in comps.values())
    return {
        "method": "config + fake-tensor trace (no weights loaded)",
        "batch_size": batch, "seq_len": seq, "seq_source": src, "precision": tc.precision,
        "device": device or "cpu",
        "params": parts["params"],
        **comps,
        "total_bytes": total,
        "training_bytes": total - comps["weights"]["total_bytes"],
        "seconds": round(time.perf_counter() - t0, 2),
    }


def _to_fake(model) -> dict[int, torch.Tensor]:
    """Replace meta parameters/buffers by fake CPU tensors in place; {id(old): new}."""
    done: dict[int, torch.Tensor] = {}
    for mod in model.modules():
        for store, is_param in ((mod._parameters, True), (mod._buffers, False)):
            for name, t in list(store.items()):
                if t is None:
                    continue
                if id(t) not in done:
                    new = torch.empty(t.shape, dtype=t.dtype, device="cpu")
                    done[id(t)] = torch.nn.Parameter(new, requires_grad=t.requires_grad) if is_param else new
                store[name] = done[id(t)]
    return done


def _static_parts(model, quantized: set[int], quant: str, double_quant: bool, cast: set[int],
                  compute_dtype: torch.dtype) -> dict:
    from collections import defaultdict

    seen: set = set()
    by: dict[str, int] = defaultdict(int)
    trainable = total = tensors = 0
    grad = opt = 0
    for p in model.parameters():
        if _sid(p) in seen:
            continue
        seen.add(_sid(p))
        total += p.numel()
        if id(p) in quantized:
            if quant == "4bit":
                packed, state = quant4_bytes(p.numel(), double_quant)
                by["4bit packed"] += packed
            else:
                by["int8"] += p.numel()
                state = p.shape[0] * 4  # SCB: one fp32 scale per output row
            by["quant_state"] += state
        elif id(p) in cast:
            by[str(compute_dtype).removeprefix("torch.")] += p.numel() * compute_dtype.itemsize
        else:
            by[str(p.dtype).removeprefix("torch.")] += _nbytes(p)
        if p.requires_grad:
            trainable += p.numel()
            tensors += 1
            grad += _nbytes(p)
            opt += 2 * _nbytes(p) + 4
    for b in model.buffers():
        if _sid(b) not in seen:
            seen.add(_sid(b))
            by["buffers"] += _nbytes(b)
    return {
        "params": {"total": total, "trainable": trainable, "trainable_tensors": tensors},
        "weights": {"by_type": dict(by), "total_bytes": sum(by.values())},
        "gradients": {"total_bytes": grad},
        "optimizer": {"formula": "AdamW: 2 x trainable x element size + 4 B/tensor", "total_bytes": opt},
    }


def _activations(model, auto_name: str, batch: int, seq: int, precision: str) -> dict:
    from collections import defaultdict

    exclude = {_sid(t) for t in list(model.parameters()) + list(model.buffers())}
    saved: dict[int, tuple[int, str]] = {}

    def pack(t):
        k = _sid(t)
        if k not in exclude and k not in saved:
            saved[k] = (t.untyped_storage().nbytes(), str(t.dtype).removeprefix("torch."))
        return t

    amp = precision in ("bf16", "fp16")
    with torch.autocast("cpu", dtype=backbone.DTYPES[precision], enabled=amp), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**_fake_batch(auto_name, batch, seq))
    by: dict[str, int] = defaultdict(int)
    for b, dt in saved.values():
        by[dt] += b
    return {"by_dtype": dict(by), "tensors": len(saved), "total_bytes": sum(by.values())}


def rel_error(est: float | None, ref: float | None) -> float | None:
    """(estimate - reference) / reference."""
    if est is None or not ref:
        return None
    return (est - ref) / ref


def render(est: dict, recipe=None) -> None:
    """The estimate as a terminal table."""
    from rich.console import Console
    from rich.table import Table

    def mib(b):
        return f"{b / 2**20:,.1f} MiB"

    p = est["params"]
    title = (f"{recipe.strategy.name} on {recipe.model.name}: " if recipe is not None else "") + (
        f"batch {est['batch_size']} x seq {est['seq_len']}, {est['precision']}")
    t = Table(title=title)
    t.add_column("component")
    t.add_column("bytes", justify="right")
    t.add_column("detail")
    w = est["weights"]
    t.add_row("weights", mib(w["total_bytes"]), ", ".join(f"{k} {mib(v)}" for k, v in w["by_type"].items()))
    t.add_row("gradients", mib(est["gradients"]["total_bytes"]), f"{p['trainable']:,} trainable params")
    t.add_row("optimizer", mib(est["optimizer"]["total_bytes"]), est["optimizer"]["formula"])
    a = est["activations"]
    t.add_row("activations", mib(a["total_bytes"]),
              f"{a['tensors']} saved tensors: " + ", ".join(f"{k} {mib(v)}" for k, v in a["by_dtype"].items()))
    t.add_row("[bold]total[/bold]", f"[bold]{mib(est['total_bytes'])}[/bold]",
              f"trainable {p['trainable']:,} / {p['total']:,} ({100 * p['trainable'] / max(p['total'], 1):.2f}%)")
    c = Console()
    c.print(t)
    c.print(f"seq length: {est['seq_source']}; {est['method']}; {est['seconds']} s. "
            "Not included: allocator overhead and backward temporaries.")
