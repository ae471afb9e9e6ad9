"""Faster kernels for one training step: Liger's fused Triton kernels, per-block torch.compile,
and the one decision on padding-free batches.

- ``model.kernels`` (auto | none | liger): liger-kernel's fused linear cross-entropy (the
  batch x seq x vocab logits never exist), RMSNorm, RoPE and SwiGLU for the decoders it covers.
  Its kernels are Triton, so CUDA only: ``auto`` turns them on for a CUDA causal LM that liger
  covers, off everywhere else; an explicit ``liger`` that cannot run is a one-line error.
- ``model.compile`` (none | blocks): ``torch.compile`` on each decoder block in place. Blocks of
  one model are the same code, so dynamo compiles one graph and reuses it: compile time stays
  that of one block, and the state dict keeps its keys (no ``_orig_mod.`` prefix).
- ``train.padding_free``: left unset, it is on for causal LMs on CUDA when the attention runs a
  variable-length FlashAttention kernel (``padding_free``), off otherwise.

The trainer calls ``apply(model, recipe, device)`` once, after the strategy wrapped the model
and before the first step; Liger is applied earlier, by ``model.backbone.load``, because its
patches address the transformers model's own modules (before peft wraps them).
"""

from __future__ import annotations

import importlib
import sys
import time
from contextlib import contextmanager

import torch

from peftkit.errors import UserError

# Module-level functions Liger replaced in a transformers modeling module: {module: {name: original}}.
# An instance cannot carry RoPE (attention looks ``apply_rotary_pos_emb`` up in its module), so
# those stay patched; ``stock()`` puts the originals back for code that runs without CUDA
# (the memory estimate traces on fake CPU tensors).
_GLOBAL_PATCHES: dict = {}


def _liger():
    """liger_kernel.transformers, or a reason it cannot be imported (it needs triton)."""
    try:
        return importlib.import_module("liger_kernel.transformers"), None
    except ImportError as e:
        return None, f"liger-kernel cannot be imported ({e}); pip install liger-kernel (with triton, CUDA)"


def liger_covers(model_type: str | None) -> bool:
    mod, _ = _liger()
    if mod is None:
        return False
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    return model_type in MODEL_TYPE_TO_APPLY_LIGER_FN


def liger_choice(requested: str, model_type: str | None, causal_lm: bool, device_type: str) -> tuple[bool, str]:
    """(use Liger, why). An explicit ``liger`` that cannot run raises a one-line UserError."""
    if requested == "none":
        return False, "model.kernels: none"
    why = None
    if device_type != "cuda":
        why = f"Liger's kernels are Triton (CUDA only); this run is on {device_type}"
    elif _liger()[0] is None:
        why = _liger()[1]
    elif not liger_covers(model_type):
        why = f"liger-kernel has no kernels for model type '{model_type}'"
    elif requested == "auto" and not causal_lm:
        why = "auto: only causal LMs (its fused loss is the main gain)"
    if why is None:
        return True, f"{'auto: ' if requested == 'auto' else ''}CUDA, liger covers '{model_type}'"
    if requested == "liger":
        raise UserError(f"model.kernels: liger cannot run: {why}")
    return False, "auto: " + why


def is_causal_lm(model) -> bool:
    from transformers import GenerationMixin

    return isinstance(model, GenerationMixin)


def apply_liger(model, requested: str, device_type: str) -> dict:
    """Liger's kernels on ``model`` (a transformers model, before peft wraps it) when chosen.

    Returns what ran: ``{"used": "liger"|"none", "reason", "fused_loss"}``; ``fused_loss``: the
    training loss never builds the logits (the memory estimate traces that).
    """
    model_type = getattr(model.config, "model_type", None)
    causal = is_causal_lm(model)
    use, why = liger_choice(requested, model_type, causal, device_type)
    if not use:
        return {"used": "none", "reason": why, "fused_loss": False}
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    module = sys.modules[type(model).__module__]
    before = dict(vars(module))
    # The fused loss replaces *ForCausalLM.forward; other heads keep their forward (and logits).
    _apply_liger_kernel_to_instance(model=model, fused_linear_cross_entropy=causal)
    changed = {k: v for k, v in before.items() if vars(module).get(k) is not v}
    for name, orig in changed.items():
        if isinstance(orig, type):  # classes: the instance's modules are patched already
            setattr(module, name, orig)
        else:
            _GLOBAL_PATCHES.setdefault(module, {})[name] = (orig, getattr(module, name))
    return {"used": "liger", "reason": why, "fused_loss": causal}


@contextmanager
def stock():
    """Liger's module-level patches undone for the duration (fake-tensor tracing on CPU)."""
    for module, names in _GLOBAL_PATCHES.items():
        for name, (orig, _) in names.items():
            setattr(module, name, orig)
    try:
        yield
    finally:
        for module, names in _GLOBAL_PATCHES.items():
            for name, (_, new) in names.items():
                setattr(module, name, new)


def fused_loss_chunk(tokens: int, hidden: int, vocab: int) -> int:
    """Positions per chunk of Liger's fused linear cross-entropy (its own rule: a chunk's logits
    are about as large as the hidden states, rounded up to a power of two)."""
    inc = max(1, -(-vocab // hidden))
    chunk = 1 << max(0, (-(-tokens // inc) - 1).bit_length())
    return min(chunk, tokens)


# -- per-block compile ------------------------------------------------------------------------
def decoder_blocks(model) -> list[torch.nn.Module]:
    """The repeated blocks of the transformers model inside ``model`` (peft, DDP wrappers seen
    through), found by the classes the model declares as unsplittable (``_no_split_modules``)."""
    from transformers import PreTrainedModel

    inner = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    names = set(getattr(inner, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def compile_blocks(model, **compile_kwargs) -> int:
    """``torch.compile`` each decoder block in place, for training; the number of blocks compiled.

    Training forwards run without a KV cache (``config.use_cache = False``): the cache is indexed by
    the block's ``layer_idx``, so with it every block would be its own graph (and past dynamo's
    recompile limit, eager again). Forwards without gradients (evaluation, generation, where
    ``generate`` turns the cache on by itself) stay eager: they would recompile per layer.
    """
    blocks = decoder_blocks(model)
    if not blocks:
        raise UserError("model.compile: blocks: no decoder blocks found in this model "
                        "(it declares no _no_split_modules); use train.compile instead")
    from transformers import PreTrainedModel

    for m in model.modules():
        if isinstance(m, PreTrainedModel) and hasattr(m.config, "use_cache"):
            m.config.use_cache = False
    for b in blocks:
        b._compiled_call_impl = _training_only(b._call_impl, torch.compile(b._call_impl, **compile_kwargs))
    return len(blocks)


def _training_only(eager, compiled):
    def call(*args, **kwargs):
        return (compiled if torch.is_grad_enabled() else eager)(*args, **kwargs)

    return call


def compile_seconds() -> float | None:
    """Seconds dynamo and inductor spent compiling in this process so far (None: nothing compiled)."""
    from torch._dynamo.utils import compilation_time_metrics

    # dynamo + the forward graph's inductor compile happen in compile_inner; AOTAutograd compiles
    # the backward graph lazily, at the first backward, under its own key.
    keys = ("_compile.compile_inner", "compile_fx.<locals>.bw_compiler")
    total = sum(sum(v) for k, v in compilation_time_metrics.items() if k in keys)
    return round(total, 3) if total else None


# -- padding-free -----------------------------------------------------------------------------
# Attention implementations that turn restarting position ids into variable-length kernels
# (no FLOP or byte spent on padding); SDPA/eager build a block-diagonal mask instead (no gain).
VARLEN = ("flash_attention_2", "flash_attention_3", "flash_attention_4")


def padding_free(recipe, attn_impl: str, device_type: str) -> tuple[bool, str]:
    """(train with padding-free batches, why): the recipe's value when it sets one; otherwise on
    for causal LMs on CUDA whose attention runs variable-length FlashAttention kernels."""
    tc = recipe.train
    if "padding_free" in tc.model_fields_set:
        return tc.padding_free, "train.padding_free"
    if recipe.task.kind != "causal_lm":
        return False, f"default: off for task.kind {recipe.task.kind} (one label per token needed)"
    if device_type != "cuda" or attn_impl not in VARLEN:
        return False, f"default: off ({attn_impl} on {device_type} has no variable-length kernel)"
    return True, f"default: causal LM on CUDA with {attn_impl}'s variable-length kernel"


# -- what the trainer calls -------------------------------------------------------------------
def apply(model, recipe, device) -> tuple[torch.nn.Module, dict]:
    """Per-block compile (``model.compile``) and the padding-free decision, once, after the
    strategy and before the first step. Returns (model, info for result.json's ``run``)."""
    device_type = torch.device(device).type
    mc = recipe.model
    if mc.compile == "blocks" and recipe.train.compile:
        raise UserError("model.compile: blocks and train.compile: true both compile the model; choose one")
    info = {"compile": mc.compile}
    if mc.compile == "blocks":
        t0 = time.perf_counter()
        info["compiled_blocks"] = compile_blocks(model)
        info["compile_setup_s"] = round(time.perf_counter() - t0, 3)  # compiling itself happens at the first step
    info["padding_free"], info["padding_free_reason"] = padding_free(recipe, _attn_of(model), device_type)
    return model, info


def report(info: dict) -> dict:
    """``apply``'s info for result.json's ``run.kernels``, with the compile time spent by now
    (after training: dynamo compiles at the first steps, which the median step leaves out)."""
    return {**info, "compile_s": compile_seconds()} if info.get("compile") == "blocks" else dict(info)


def _attn_of(model) -> str:
    """The attention implementation of the transformers model inside wrappers (peft, DDP)."""
    from transformers import PreTrainedModel

    inner = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    return getattr(getattr(inner, "config", None), "_attn_implementation", None) or "sdpa"
