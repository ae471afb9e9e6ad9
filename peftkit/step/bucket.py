"""Bucketed sequence lengths (``train.pad_to_multiple_of``): fewer distinct batch shapes.

Dynamic padding gives nearly every batch its own length; ``torch.compile`` specialises on
shapes, so each new length can mean a new graph (or a dynamic-shape one with slower kernels).
Rounding the padded length up to a multiple of ``m`` caps the shapes at ``max_length / m``
for a few percent more padding. Only the training loader is bucketed.
"""

from __future__ import annotations

import torch

# padding value per [B, T] key; keys not listed (and 1-D tensors) are left as they are
PAD = {"attention_mask": 0, "token_type_ids": 0, "labels": -100}


def round_up(n: int, m: int | None, cap: int | None = None) -> int:
    """``n`` rounded up to a multiple of ``m``, but never past ``cap`` (the task's max_length:
    position embeddings end somewhere) unless ``n`` already is."""
    if not m:
        return n
    r = -(-n // m) * m
    return min(r, max(n, cap)) if cap else r


class PadToMultiple:
    def __init__(self, collate, multiple: int, pad_token_id: int | None, cap: int | None = None):
        self.collate, self.m, self.cap = collate, multiple, cap
        self.pad = {**PAD, "input_ids": pad_token_id or 0}

    def __call__(self, features: list[dict]) -> dict:
        batch = self.collate(features)
        ids = batch.get("input_ids")
        if not isinstance(ids, torch.Tensor) or ids.ndim != 2:
            return batch
        t = ids.shape[1]
        extra = round_up(t, self.m, self.cap) - t
        if extra == 0:
            return batch
        for k, v in self.pad.items():
            x = batch.get(k)
            if isinstance(x, torch.Tensor) and x.ndim == 2 and x.shape[1] == t:
                batch[k] = torch.nn.functional.pad(x, (0, extra), value=v)  # right padding, as the collators
        return batch
