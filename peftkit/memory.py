"""Exact memory accounting of a training run: weights, gradients, optimizer state, activations.

Every count is in bytes of tensor storage, each storage counted once (tied weights, views and
tensors saved twice share a storage). Works on any device; nothing is sampled.
"""

from __future__ import annotations

from collections import defaultdict

import torch


def _key(t: torch.Tensor) -> tuple:
    s = t.untyped_storage()
    return (t.device.type, t.device.index, s.data_ptr())


def _nbytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


def _quant_tensors(qs) -> list[torch.Tensor]:
    """Tensors of a bitsandbytes QuantState (absmax, code, offset, nested state2)."""
    out = []
    for name in ("absmax", "code", "offset"):
        t = getattr(qs, name, None)
        if isinstance(t, torch.Tensor):
            out.append(t)
    if getattr(qs, "state2", None) is not None:
        out += _quant_tensors(qs.state2)
    return out


def weight_bytes(model: torch.nn.Module) -> dict:
    """Parameter + buffer bytes by storage type; 4-bit weights at packed size plus quant state."""
    seen: set = set()
    by: dict[str, int] = defaultdict(int)

    def add(label: str, t: torch.Tensor):
        k = _key(t)
        if k in seen or t.device.type == "meta":
            return
        seen.add(k)
        by[label] += _nbytes(t)

    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            add(f"{qs.quant_type}(4bit packed)", p)
            for t in _quant_tensors(qs):
                add("quant_state", t)
        elif getattr(p, "SCB", None) is not None or p.dtype == torch.int8:
            add("int8", p)
            if isinstance(getattr(p, "SCB", None), torch.Tensor):
                add("quant_state", p.SCB)
        else:
            add(str(p.dtype).removeprefix("torch."), p)
    for b in model.buffers():
        add("buffers", b)
    return {"by_type": dict(by), "total_bytes": sum(by.values())}


def grad_bytes(model: torch.nn.Module) -> dict:
    seen: set = set()
    total = n = 0
    for p in model.parameters():
        if p.grad is not None and _key(p.grad) not in seen:
            seen.add(_key(p.grad))
            total += _nbytes(p.grad)
            n += 1
    return {"tensors": n, "total_bytes": total}


def optimizer_bytes(opt) -> dict:
    """Bytes of the optimizer's actual state tensors, by state name (AdamW: exp_avg, exp_avg_sq, step)."""
    opt = getattr(opt, "optimizer", opt)  # accelerate wraps it
    seen: set = set()
    by: dict[str, int] = defaultdict(int)
    for state in opt.state.values():
        for name, t in state.items():
            if isinstance(t, torch.Tensor) and _key(t) not in seen:
                seen.add(_key(t))
                by[name] += _nbytes(t)
    return {"by_state": dict(by), "total_bytes": sum(by.values())}


class SavedTensors:
    """Bytes of tensors autograd saves for backward, per forward pass; keeps the largest pass.

    Storages of parameters/buffers (and of their grads) are excluded: they are weights, not
    activations. Autocast's low-precision weight copies are included: they are extra memory.
    Use one instance around several forward+backward passes: ``with acc.pass_(shape): ...``.
    """

    def __init__(self, model: torch.nn.Module):
        self.exclude = {_key(t) for t in list(model.parameters()) + list(model.buffers()) if t.device.type != "meta"}
        self.peak_bytes = 0
        self.peak_shape: tuple | None = None
        self.peak_by_dtype: dict[str, int] = {}
        self.peak_tensors = 0
        self.passes = 0
        self._cur: dict = {}

    def _pack(self, t: torch.Tensor):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            try:
                k = _key(t)
            except (RuntimeError, NotImplementedError):  # tensor subclasses without storage
                return t
            if k not in self.exclude and k not in self._cur:
                self._cur[k] = (_nbytes(t), str(t.dtype).removeprefix("torch."))
        return t

    def pass_(self, shape: tuple | None = None):
        return _Pass(self, shape)

    def _close(self, shape):
        self.passes += 1
        total = sum(b for b, _ in self._cur.values())
        if total > self.peak_bytes:
            by: dict[str, int] = defaultdict(int)
            for b, dt in self._cur.values():
                by[dt] += b
            self.peak_bytes, self.peak_shape = total, shape
            self.peak_by_dtype, self.peak_tensors = dict(by), len(self._cur)
        self._cur = {}

    def summary(self) -> dict:
        return {"total_bytes": self.peak_bytes, "batch_shape": list(self.peak_shape) if self.peak_shape else None,
                "by_dtype": self.peak_by_dtype, "tensors": self.peak_tensors, "passes": self.passes}


class _Pass:
    def __init__(self, owner: SavedTensors, shape):
        self.owner, self.shape = owner, shape
        self.hooks = torch.autograd.graph.saved_tensors_hooks(owner._pack, lambda t: t)

    def __enter__(self):
        self.owner._cur = {}
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)
        self.owner._close(self.shape)


class Accountant:
    """What the trainer uses: saved tensors on every pass, grads/optimizer once after a step."""

    def __init__(self, model: torch.nn.Module):
        self.saved = SavedTensors(model)
        self.weights = weight_bytes(model)
        self.grads: dict | None = None
        self.optimizer: dict | None = None

    def after_backward(self, model):
        if self.grads is None:
            g = grad_bytes(model)
            if g["tensors"]:
                self.grads = g

    def after_step(self, model, opt):
        if self.optimizer is None:
            o = optimizer_bytes(opt)
            if o["total_bytes"]:
                self.optimizer = o
                # After a step: bitsandbytes has cast 4-bit biases to the compute dtype by now.
                self.weights = weight_bytes(model)

    def summary(self) -> dict:
        comps = {
            "weights": self.weights,
            "gradients": self.grads or {"tensors": 0, "total_bytes": 0},
            "optimizer": self.optimizer or {"by_state": {}, "total_bytes": 0},
            "activations": self.saved.summary(),
        }
        return {"method": "exact: storages of parameters, .grad, optimizer.state, saved_tensors_hooks",
                **comps, "total_bytes": sum(c["total_bytes"] for c in comps.values())}


def batch_shape(batch: dict) -> tuple | None:
    t = batch.get("input_ids")
    return tuple(t.shape) if isinstance(t, torch.Tensor) else None


def section(estimate: dict, accounting: dict, measured: dict) -> dict:
    """result["memory"]: the three views and the estimate's relative errors.

    On CPU the measured peak is RSS above the post-load baseline, so it is compared with the
    estimate without weights; on CUDA max_memory_allocated includes weights.
    """
    from .estimate import rel_error

    est_total = estimate.get("total_bytes")
    if measured.get("method") == "cuda":
        vs_measured, basis = rel_error(est_total, measured.get("peak_bytes")), "total vs max_memory_allocated"
    else:
        vs_measured = rel_error(estimate.get("training_bytes"), measured.get("peak_bytes"))
        basis = "training bytes (total - weights) vs peak RSS above the post-load baseline"
    errors = {"estimate_vs_accounting": rel_error(est_total, accounting.get("total_bytes")),
              "estimate_vs_measured": vs_measured, "measured_basis": basis}
    for comp in ("weights", "gradients", "optimizer", "activations"):
        errors[f"{comp}_vs_accounting"] = rel_error((estimate.get(comp) or {}).get("total_bytes"),
                                                    (accounting.get(comp) or {}).get("total_bytes"))
    return {"estimate": estimate, "accounting": accounting, "measured": measured, "errors": errors}
