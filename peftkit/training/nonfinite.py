"""What to do when the loss or the gradients are NaN/Inf: skip the step a bounded number of
times (``train.nonfinite: skip``, ``train.max_nonfinite_skips``) or stop (``stop``).

Deciding on the host needs the loss and the gradient norm there: a device sync every step.
With an optimizer that takes a ``found_inf`` flag (torch's fused AdamW, the default; what
``GradScaler`` uses) the guard decides on the device instead: the flag makes the optimizer
leave weights, moments and its step count as they were, exactly as a skipped step. The
skips are then counted, warned about and checked against the policy when the step's values
are read (every ``train.log_every`` steps and before a checkpoint), in step order, with the
same messages. Any other optimizer (or fp16 loss scaling) decides on the host, every step.
"""

from __future__ import annotations

import math

import torch

from peftkit.errors import TrainingFailed


class NonFiniteGuard:
    def __init__(self, policy: str, max_skips: int, scaler, warn):
        self.policy, self.max_skips, self.scaler, self.warn = policy, max_skips, scaler, warn
        self.skips = 0

    def on_device(self, opt) -> bool:
        """Whether this optimizer can skip a step from a device-side flag (no host read)."""
        inner = getattr(opt, "optimizer", opt)  # accelerate's wrapper
        return (self.scaler is None and isinstance(inner, torch.optim.Optimizer)
                and bool(getattr(inner, "_step_supports_amp_scaling", False)))

    @staticmethod
    def grad_norm(grad_norm, model) -> torch.Tensor:
        """The gradient norm (clipping's, or computed here when train.max_grad_norm is off)."""
        if grad_norm is not None:
            return grad_norm
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads) if grads else torch.tensor(0.0)

    def mask(self, opt, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        """Arm ``opt`` to skip its next step if the loss or the gradients are not finite; the flag."""
        bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm.to(loss.device)))
        getattr(opt, "optimizer", opt).found_inf = bad.to(device=grad_norm.device, dtype=torch.float32)
        return bad

    def step_ok(self, loss: float, grad_norm, model, step: int) -> bool:
        """Host decision: True if the optimizer may step; False to skip it (grads are then zeroed)."""
        norm = None if self.scaler is not None else float(self.grad_norm(grad_norm, model))
        return self.check(step, loss, norm)

    def settle(self, v: dict, sched) -> bool:
        """A step read from the device (``state.read_values``): True if it was taken. A step the
        device skipped is counted here, in step order, with the host path's messages and policy."""
        if v["ok"] is not None:  # decided on the host already
            return v["ok"]
        ok = self.check(v["step"], v["loss_sum"], v["grad_norm"])
        if not ok:
            unstep_scheduler(sched, v["sched_steps"])
        return ok

    def check(self, step: int, loss: float, norm: float | None) -> bool:
        """``step``'s loss and gradient norm (None: fp16 loss scaling handles inf gradients):
        True if finite; else count the skip, or raise per the policy."""
        what = None
        if not math.isfinite(loss):
            what = f"loss {loss}"
        elif norm is not None and not math.isfinite(norm):
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


def unstep_scheduler(sched, n: int) -> None:
    """Take back a skipped step's ``n`` scheduler increments (decided on the device, found when
    read): from here on the learning rate is what a host-side skip would have left. The steps
    between the skip and the read (< train.log_every) ran one schedule step ahead."""
    inner = getattr(sched, "scheduler", sched)
    inner.last_epoch -= n + 1
    inner.step()  # recomputes every group's lr at the rewound position
