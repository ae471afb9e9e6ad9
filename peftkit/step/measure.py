"""Measuring: clocks (synchronised step timing) and the process's resident memory (RSS),
CUDA's memory peaks. FLOPs and MFU are in ``peftkit.step.flops``, provenance in
``peftkit.provenance``."""

from __future__ import annotations

import math
import statistics
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import psutil
import torch

_SELF = psutil.Process()


def rss_bytes() -> int:
    """Current (not peak) resident set size of this process, on any OS (psutil)."""
    return int(_SELF.memory_info().rss)


class PeakRSS:
    """Samples RSS in a thread; ``peak - baseline`` is what training added on top of loading."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.baseline = rss_bytes()
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def cuda_reset():
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def cuda_peaks() -> dict:
    if not torch.cuda.is_available():
        return {}
    torch.cuda.synchronize()
    return {
        "max_allocated_bytes": int(torch.cuda.max_memory_allocated()),
        "max_reserved_bytes": int(torch.cuda.max_memory_reserved()),
    }


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@dataclass
class Step:
    """One optimizer step as the timer saw it; ``kind``: warmup, steady, or what kept it out of
    ``speed`` (``probe``: the live-memory probe; ``flops``: the FLOP counter's learning step)."""

    step: int
    kind: str
    seconds: float = 0.0
    samples: int = 0
    tokens: int = 0


class StepTimer:
    """Wall time per optimizer step, without a device sync per step.

    On CUDA each step is bracketed by two timing events read only at ``read()`` (every
    ``train.log_every`` steps): a sync per step would stall the queue the host keeps ahead of
    the GPU. On CPU the host clock is the step's clock. Samples and real tokens arrive as
    device tensors and are read at the same time. The first ``warmup`` steps and the steps in
    ``excluded`` (measurement steps: they sync and run extra hooks) stay out of the summary.
    """

    def __init__(self, warmup: int, excluded: dict[int, str] | None = None, reduce=None):
        self.warmup = warmup
        self.excluded = dict(excluded or {})  # step -> why it is not timed
        self.reduce = reduce  # sums a tensor over processes (None: one process)
        self.steps: list[Step] = []  # read steps, in order
        self.flops = 0.0  # model FLOPs of the steady steps (peftkit.step.flops), summed over ranks by the caller
        # [FLOPs, Step] of the FLOP counter's own (excluded) step: FLOPs per token when no steady step ran
        self.flops_step: list | None = None
        self._open: list[tuple] = []  # (Step, start, end, samples, tokens) not read yet
        self._summary: dict | None = None
        self._cuda = torch.cuda.is_available()

    def kind(self, step: int) -> str:
        if step in self.excluded:
            return self.excluded[step]
        return "warmup" if len(self.steps) + len(self._open) < self.warmup else "steady"

    @property
    def times(self) -> list[float]:
        """Seconds of the warm-up and steady steps (measurement steps are not in it)."""
        return [s.seconds for s in self.steps if s.kind in ("warmup", "steady")]

    @contextmanager
    def step(self, step: int):
        rec = Step(step, self.kind(step))
        if rec.kind not in ("warmup", "steady"):
            sync()  # a measurement step: its own syncs and hooks stay inside it
        if self._cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield rec
            end.record()
        else:
            start = time.perf_counter()
            yield rec
            end = time.perf_counter()
        if rec.kind not in ("warmup", "steady"):
            sync()
        self._open.append([rec, start, end, 0, 0])

    def add_counts(self, samples, tokens):
        """Samples and real tokens of the step just timed (ints or device tensors; this process)."""
        self._open[-1][3:] = [samples, tokens]

    def add_flops(self, flops: float):
        self.flops += flops

    def read(self) -> list[Step]:
        """Bring the steps since the last read to the host (one sync); the steps read."""
        if not self._open:
            return []
        if self._cuda:
            self._open[-1][2].synchronize()
        vals = [x for o in self._open for x in o[3:]]
        dev = next((x.device for x in vals if torch.is_tensor(x)), torch.device("cpu"))
        counts = torch.stack([torch.as_tensor(x, dtype=torch.float64, device=dev) for x in vals])
        if self.reduce is not None:
            counts = self.reduce(counts)
        counts = counts.tolist()
        for i, (rec, start, end, _, _) in enumerate(self._open):
            rec.seconds = start.elapsed_time(end) / 1e3 if self._cuda else end - start
            rec.samples, rec.tokens = int(counts[2 * i]), int(counts[2 * i + 1])
        read, self._open, self._summary = [o[0] for o in self._open], [], None
        self.steps += read
        return read

    def summary(self) -> dict:
        """Speed over the steady steps (all timed steps when there are none); host values only:
        steps not read yet are not in it."""
        if self._summary is None:
            self._summary = _speed(self)
        return self._summary


def _speed(timer: StepTimer) -> dict:
    timed = [s for s in timer.steps if s.kind == "steady"] or [s for s in timer.steps if s.kind == "warmup"] \
        or timer.steps
    secs = sorted(s.seconds for s in timed)
    total, samples, tokens = sum(secs), sum(s.samples for s in timed), sum(s.tokens for s in timed)
    median = statistics.median(secs) if secs else None
    flops = timer.flops if any(s.kind == "steady" for s in timed) else 0.0
    return {
        "warmup_steps": sum(s.kind == "warmup" for s in timer.steps),
        "timed_steps": len(timed),
        "excluded_steps": {s.kind: s.step for s in timer.steps if s.kind not in ("warmup", "steady")},
        "train_samples": samples,  # of the timed steps, all processes
        "train_tokens": tokens,
        "step_time_median_s": median,
        "step_time_p50_s": median,
        "step_time_p90_s": secs[min(len(secs) - 1, math.ceil(0.9 * len(secs)) - 1)] if secs else None,
        "step_time_max_s": secs[-1] if secs else None,
        # steps slower than 1.5x the median after warm-up: stalls (host syncs, allocator, I/O)
        "stalls": sum(x > 1.5 * median for x in secs) if secs else 0,
        "train_samples_per_s": samples / total if total and samples else None,
        "train_tokens_per_s": tokens / total if total and tokens else None,
        "model_flops_per_s": flops / total if total and flops else None,
        "model_flops_per_token": flops / tokens if tokens and flops else _counted_per_token(timer),
    }


def _counted_per_token(timer: StepTimer) -> float | None:
    """FLOPs per token from the counting step alone (a run too short for a steady step): a
    property of the model and the batch shape, not a speed, so an excluded step may give it."""
    f = timer.flops_step
    return f[0] / f[1].tokens if f and f[0] and f[1].tokens else None
