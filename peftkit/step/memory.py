"""Every byte of a training run: static accounting and the measured live peak of one step.

Every count is in bytes of tensor storage, each storage counted once (tied weights, views and
tensors saved twice share a storage). Works on real and fake tensors, on any device.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def _local(t: torch.Tensor) -> torch.Tensor:
    # A sharded (FSDP2 DTensor) parameter: this process holds its local shard only.
    return getattr(t, "_local_tensor", t)


def _key(t: torch.Tensor) -> int:
    return _local(t).untyped_storage()._cdata  # the StorageImpl: also distinct for fake tensors


def _nbytes(t: torch.Tensor) -> int:
    return _local(t).untyped_storage().nbytes()


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


def weight_tensors(model: torch.nn.Module):
    """(label, tensor) for every parameter, buffer and bitsandbytes quant-state tensor."""
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            yield f"{qs.quant_type}(4bit packed)", p
            for t in _quant_tensors(qs):
                yield "quant_state", t
        elif getattr(p, "SCB", None) is not None or p.dtype == torch.int8:
            yield "int8", p
            if isinstance(getattr(p, "SCB", None), torch.Tensor):
                yield "quant_state", p.SCB
        else:
            yield str(p.dtype).removeprefix("torch."), p
    for b in model.buffers():
        yield "buffers", b


def _unique_bytes(pairs) -> dict[str, int]:
    seen: set = set()
    by: dict[str, int] = defaultdict(int)
    for label, t in pairs:
        k = _key(t)
        if k not in seen and t.device.type != "meta":
            seen.add(k)
            by[label] += _nbytes(t)
    return dict(by)


def weight_bytes(model: torch.nn.Module) -> dict:
    """Parameter + buffer bytes by storage type; 4-bit weights at packed size plus quant state."""
    by = _unique_bytes(weight_tensors(model))
    return {"by_type": by, "total_bytes": sum(by.values())}


def optimizer_tensors(opt):
    opt = getattr(opt, "optimizer", opt)  # accelerate wraps it
    for state in opt.state.values():
        yield from (t for t in state.values() if isinstance(t, torch.Tensor))


def optimizer_bytes(opt) -> dict:
    """Bytes of the optimizer's state tensors, by state name (AdamW: exp_avg, exp_avg_sq, step)."""
    opt = getattr(opt, "optimizer", opt)
    by = _unique_bytes((n, t) for st in opt.state.values() for n, t in st.items() if isinstance(t, torch.Tensor))
    return {"by_state": by, "total_bytes": sum(by.values())}


CATEGORIES = ("weights", "gradients", "optimizer", "activations", "temporaries")


class LiveMemory(TorchDispatchMode):
    """Bytes of live tensor storages while active: current, peak, and the split at the peak.

    Every storage an operator returns is counted once (views and in-place results share it)
    until its Python storage object is freed (a weakref callback), so this is the allocator's
    view of tensors, not RSS. Works on real and fake tensors. What existed before is counted
    only if registered (``track``): the trainer registers weights, gradients and optimizer
    state. New storages are "activations" in forward and "temporaries" in backward or in an
    optimizer step; a parameter's ``.grad`` is re-labelled "gradients" as it is accumulated.
    ``round_to`` rounds each storage up (the CUDA caching allocator: 512 B). ``phases``: the
    peak and its split within forward, backward and the optimizer step (the estimate
    extrapolates each, since which phase peaks can change with depth).
    """

    def __init__(self, round_to: int = 1):
        super().__init__()
        self.round_to = round_to
        self._live: dict[int, list] = {}  # id(storage) -> [weakref, bytes, category]
        self.by = dict.fromkeys(CATEGORIES, 0)
        self.current = self.peak = 0
        self.peak_by = dict(self.by)
        self.in_optimizer = False
        self.phases: dict[str, dict] = {}

    def _size(self, st) -> int:
        n, r = st.nbytes(), self.round_to
        return -(-n // r) * r

    def track(self, t, category: str) -> None:
        """Count ``t``'s storage under ``category`` (moving it there if already counted)."""
        try:
            st = _local(t).untyped_storage()  # a sharded (DTensor) parameter: its local shard
        except (RuntimeError, NotImplementedError, TypeError):  # subclasses without storage
            return
        e = self._live.get(id(st))
        if e is None:
            k = id(st)
            e = self._live[k] = [weakref.ref(st, lambda _r, k=k: self._free(k)), 0, category]
        self._move(e, category, self._size(st))

    def _move(self, e: list, category: str, size: int) -> None:
        self.by[e[2]] -= e[1]
        self.current += size - e[1]
        e[1], e[2] = size, category
        self.by[category] += size
        if self.current > self.peak:
            self.peak, self.peak_by = self.current, dict(self.by)
        ph = self.phases.get(phase := self._phase())
        if ph is None or self.current > ph["peak_bytes"]:
            self.phases[phase] = {"peak_bytes": self.current, "at_peak": dict(self.by)}

    def _free(self, k: int) -> None:
        e = self._live.pop(k, None)
        if e is not None:
            self.by[e[2]] -= e[1]
            self.current -= e[1]

    def _phase(self) -> str:
        if self.in_optimizer:
            return "optimizer"
        return "backward" if torch._C._current_graph_task_id() != -1 else "forward"

    def _new_category(self) -> str:
        return "activations" if self._phase() == "forward" else "temporaries"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                try:
                    st = t.untyped_storage()
                except (RuntimeError, NotImplementedError, TypeError):
                    continue
                e = self._live.get(id(st))
                if e is None:
                    self.track(t, self._new_category())
                elif e[1] != self._size(st):  # resized in place
                    self._move(e, e[2], self._size(st))
        return out

    def summary(self) -> dict:
        return {"peak_bytes": self.peak, "at_peak": dict(self.peak_by), "current_bytes": self.current,
                "phases": {k: {**v, "at_peak": dict(v["at_peak"])} for k, v in self.phases.items()}}


def track_state(tracker: LiveMemory, model: torch.nn.Module, opt=None) -> list:
    """Register what exists before a step; a hook re-labels each new ``.grad``. Returns handles."""
    for _, t in weight_tensors(model):
        tracker.track(t, "weights")
    handles = []
    for p in model.parameters():
        if p.grad is not None:
            tracker.track(p.grad, "gradients")
        if p.requires_grad:
            handles.append(p.register_post_accumulate_grad_hook(lambda q: tracker.track(q.grad, "gradients")))
    if opt is not None:
        inner = getattr(opt, "optimizer", opt)  # accelerate wraps it
        for t in optimizer_tensors(inner):
            tracker.track(t, "optimizer")

        def pre(*_):
            tracker.in_optimizer = True

        def post(*_):
            tracker.in_optimizer = False
            for t in optimizer_tensors(inner):
                tracker.track(t, "optimizer")

        handles += [inner.register_step_pre_hook(pre), inner.register_step_post_hook(post)]
    return handles


class StepPeak:
    """Measure the live peak of ONE training step (the trainer's plug point); free otherwise.

    ``with probe.around(step, model, opt): <forward, backward, optimizer step, zero_grad>``
    tracks only when ``step == probe.at``; on CUDA it also resets and reads the allocator's
    max_memory_allocated / max_memory_reserved over that step.
    """

    def __init__(self, at: int):
        self.at = at
        self.result: dict | None = None

    @contextlib.contextmanager
    def around(self, step: int, model, opt, shape: tuple | None = None):
        if step != self.at:
            yield
            return
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        tracker = LiveMemory()
        handles = track_state(tracker, model, opt)
        start = tracker.current
        try:
            with tracker:
                yield
        finally:
            for h in handles:
                h.remove()
        self.result = {"method": "live tensor storages over one whole training step (TorchDispatchMode tracker)",
                       "step": step, "batch_shape": list(shape) if shape else None,
                       "start_bytes": start, **tracker.summary()}
        if cuda:
            torch.cuda.synchronize()
            self.result["cuda"] = {"max_allocated_bytes": torch.cuda.max_memory_allocated(),
                                   "max_reserved_bytes": torch.cuda.max_memory_reserved()}

def batch_shape(batch: dict) -> tuple | None:
    t = batch.get("input_ids")
    return tuple(t.shape) if isinstance(t, torch.Tensor) else None


def rel_error(est: float | None, ref: float | None) -> float | None:
    """(estimate - reference) / reference."""
    if est is None or not ref:
        return None
    return (est - ref) / ref


def section(estimate: dict, live: dict | None, measured: dict, at_measured: dict | None = None) -> dict:
    """result["memory"]: the estimate, the measured live peak of one step, and the error.

    ``peak_bytes`` is THE measured peak: the live-storage peak of one whole step after warm-up
    (on CUDA: max_memory_allocated over that step). The error compares the estimate made at
    the measured step's batch shape (``at_measured``; else the run's planning estimate).
    """
    ref = at_measured if at_measured and "error" not in at_measured else estimate
    live = live or {}
    cuda = live.get("cuda") or {}
    peak = cuda.get("max_allocated_bytes") or live.get("peak_bytes")
    errors = {"estimate_vs_measured": rel_error(ref.get("peak_bytes"), peak),
              "basis": "estimate at the measured step's shape vs " + (
                  "max_memory_allocated over that step" if cuda else "live tensor peak over that step")}
    for cat in CATEGORIES:
        errors[f"{cat}_at_peak"] = rel_error((ref.get("at_peak") or {}).get(cat), (live.get("at_peak") or {}).get(cat))
    out = {"estimate": estimate, "measured": {**measured, "live": live or None}, "peak_bytes": peak, "errors": errors}
    if at_measured is not None:
        out["estimate_at_measured_shape"] = at_measured
    return out
