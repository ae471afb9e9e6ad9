"""Causal-LM training loss without the batch x seq x vocab logits (``task.loss_chunk_tokens``).

transformers' loss takes the whole logits tensor: bf16 logits, an fp32 copy, the fp32
log-softmax saved for backward and, in backward, fp32 gradients of the same size: at batch
2 x 4096 and Llama-3's 128k vocabulary that is ~4 GiB per copy and the largest term of a
LoRA step. Here the model runs with ``logits_to_keep=1`` (the output layer sees one position,
so the full logits never exist) and a forward hook on the decoder sums the cross-entropy of
its last hidden states over chunks of ``chunk`` positions, each chunk (output layer + fp32
upcast + cross-entropy) under non-reentrant activation checkpointing: only the hidden states
are kept, one chunk's logits exist at a time, in forward and in backward (where they are
recomputed: one more output-layer matmul per step). The hook runs inside ``model.forward``,
so the chunks see its autocast and are counted by ``flops.FlopCounter`` like any forward.

The value is transformers' ``ForCausalLMLoss`` without ``num_items_in_batch``: position t
predicts label t+1, -100 is ignored, the sum is divided by the number of predicted labels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from peftkit import arch
from peftkit.errors import UserError

IGNORE = -100


def supported() -> list[str]:
    """Model types whose logits are the output layer applied to the decoder's last hidden
    state, nothing after it (no soft-capping or scaling that this path would skip)."""
    return [k for k, a in arch.ARCHS.items() if a.plain_lm_head]


def _transformers_model(model):
    """The transformers ``*ForCausalLM`` under DDP, torch.compile and peft wrappers."""
    model = getattr(model, "module", model)
    model = getattr(model, "_orig_mod", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def causal_lm_loss(model, batch: dict, chunk: int) -> torch.Tensor:
    """Mean next-token cross-entropy of ``batch`` (which holds ``labels``), ``chunk`` positions at a time."""
    inner = _transformers_model(model)
    entry = arch.of(inner)
    if entry is None or not entry.plain_lm_head:
        raise UserError(f"task.loss_chunk_tokens: not supported for model type "
                        f"'{getattr(inner.config, 'model_type', None)}' (supported: {', '.join(supported())})")
    labels = F.pad(batch["labels"], (0, 1), value=IGNORE)[..., 1:]  # position t predicts t+1
    head, losses = inner.get_output_embeddings(), []

    def on_hidden(mod, args, out):
        h = out[0].reshape(-1, out[0].shape[-1])
        y = labels.reshape(-1).to(h.device)
        total = sum(checkpoint(_chunk_nll, head, h[i : i + chunk], y[i : i + chunk], use_reentrant=False)
                    for i in range(0, y.numel(), chunk))
        losses.append(total / (y != IGNORE).sum())

    hook = inner.get_decoder().register_forward_hook(on_hidden)
    try:  # the one position's logits are dropped with the output
        model(**{k: v for k, v in batch.items() if k != "labels"}, logits_to_keep=1)
    finally:
        hook.remove()
    return losses[-1]


def _chunk_nll(head, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(h).float(), y, ignore_index=IGNORE, reduction="sum")
