"""Measuring: clocks (synchronised step timing) and the process's resident memory (RSS),
CUDA's memory peaks. FLOPs and MFU are in ``peftkit.step.flops``, provenance in
``peftkit.provenance``."""

from __future__ import annotations

import statistics
import threading
import time
from contextlib import contextmanager

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


class StepTimer:
    """Wall time per optimizer step, synchronised; the first ``warmup`` steps are excluded."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.times: list[float] = []
        self.samples = 0
        self.tokens = 0
        self.flops = 0.0  # model FLOPs of the timed steps (peftkit.step.flops), summed over ranks by the caller
        self._t0 = 0.0

    @contextmanager
    def step(self):
        sync()
        t0 = time.perf_counter()
        yield
        sync()
        self.times.append(time.perf_counter() - t0)

    def add_counts(self, samples: int, tokens: int):
        """Samples and real tokens of the step just timed (ignored for warm-up steps)."""
        if len(self.times) > self.warmup:
            self.samples += samples
            self.tokens += tokens

    def add_flops(self, flops: float):
        """Model FLOPs of the step just timed (ignored for warm-up steps)."""
        if len(self.times) > self.warmup:
            self.flops += flops

    def summary(self) -> dict:
        timed = self.times[self.warmup:] or self.times
        total = sum(timed)
        return {
            "warmup_steps": min(self.warmup, len(self.times)),
            "timed_steps": len(timed),
            "train_samples": self.samples,  # of the timed steps, all processes
            "train_tokens": self.tokens,
            "step_time_median_s": statistics.median(timed) if timed else None,
            "train_samples_per_s": self.samples / total if total and self.samples else None,
            "train_tokens_per_s": self.tokens / total if total and self.tokens else None,
            "model_flops_per_s": self.flops / total if total and self.flops else None,
            "model_flops_per_token": self.flops / self.tokens if self.tokens and self.flops else None,
        }
