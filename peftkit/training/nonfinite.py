"""What to do when the loss or the gradients are NaN/Inf: skip the step a bounded number of
times (``train.nonfinite: skip``, ``train.max_nonfinite_skips``) or stop (``stop``)."""

from __future__ import annotations

import math

import torch

from peftkit.errors import TrainingFailed


class NonFiniteGuard:
    def __init__(self, policy: str, max_skips: int, scaler, warn):
        self.policy, self.max_skips, self.scaler, self.warn = policy, max_skips, scaler, warn
        self.skips = 0

    def step_ok(self, loss: float, grad_norm, model, step: int) -> bool:
        """True if the optimizer may step; False to skip it (grads are then zeroed)."""
        what = None
        if not math.isfinite(loss):
            what = f"loss {loss}"
        elif self.scaler is None:  # with fp16 loss scaling, inf gradients are the scaler's business
            if grad_norm is None:
                grads = [p.grad for p in model.parameters() if p.grad is not None]
                grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.tensor(0.0)
            norm = float(grad_norm)
            if not math.isfinite(norm):
                what = f"gradient norm {norm}"
        if what is None:
            return True
        if self.policy == "stop" or self.skips >= self.max_skips:
            why = "train.nonfinite: stop" if self.policy == "stop" else (
                f"{self.skips} step(s) skipped already, train.max_nonfinite_skips={self.max_skips}")
            raise TrainingFailed(f"step {step}: non-finite {what} ({why}); stopping. "
                                 "Try a lower train.lr, fp32 precision or train.max_grad_norm")
        self.skips += 1
        self.warn(f"step {step}: non-finite {what}; step skipped ({self.skips}/{self.max_skips})")
        return False
