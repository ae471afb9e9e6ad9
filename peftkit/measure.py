"""Measuring: process memory, CUDA memory, step timing and provenance."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import threading
import time
from contextlib import contextmanager

import torch


def rss_bytes() -> int:
    """Current resident set size of this process."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


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
        self.flops = 0.0  # model FLOPs of the timed steps (peftkit.flops), summed over ranks by the caller
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


def _git_sha() -> str | None:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict:
    import importlib.metadata as md

    versions = {}
    for name in ("peftkit", "torch", "transformers", "peft", "accelerate", "datasets", "bitsandbytes"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    return {
        "versions": versions,
        "python": platform.python_version(),
        "device": dev,
        "device_name": torch.cuda.get_device_name() if dev == "cuda" else platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "git_sha": _git_sha(),
    }


# -- MFU ----------------------------------------------------------------------------------
# The numerator, model FLOPs of training, is counted by peftkit.flops.FlopCounter.


def mfu(flops_per_s: float | None, peak_flops_per_s: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOPs/s over the device's (measured) peak."""
    if not flops_per_s or not peak_flops_per_s:
        return None
    return flops_per_s / peak_flops_per_s


def matmul_peak_flops(device: str = "cuda", dtype: torch.dtype = torch.bfloat16, n: int = 8192, iters: int = 50,
                      warmup: int = 5) -> float:
    """Measured dense matmul throughput (FLOPs/s): the denominator of MFU on this machine."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(warmup):
        torch.matmul(a, b, out=c)
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        torch.matmul(a, b, out=c)
    sync()
    return 2.0 * n**3 * iters / (time.perf_counter() - t0)
