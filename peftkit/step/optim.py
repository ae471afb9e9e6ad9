"""The optimizer of a run: AdamW (fused/foreach/plain) or bitsandbytes' 8-bit and paged AdamW.

Weight decay applies to matrices only (biases and norms have ndim < 2).
"""

from __future__ import annotations

import torch


def make_optimizer(model, tc):
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if tc.optimizer in ("adamw8bit", "paged_adamw8bit"):
        import bitsandbytes as bnb

        cls = bnb.optim.PagedAdamW8bit if tc.optimizer == "paged_adamw8bit" else bnb.optim.AdamW8bit
        return cls([g for g in groups if g["params"]], lr=tc.lr)
    kw = {"foreach": True} if tc.optimizer == "adamw_foreach" else {"fused": True} if tc.optimizer == "adamw_fused" else {"foreach": False}
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=tc.lr, **kw)
