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
        self._t0 = 0.0

    @contextmanager
    def step(self, samples: int, tokens: int):
        sync()
        t0 = time.perf_counter()
        yield
        sync()
        dt = time.perf_counter() - t0
        self.times.append(dt)
        if len(self.times) > self.warmup:
            self.samples += samples
            self.tokens += tokens

    def summary(self) -> dict:
        timed = self.times[self.warmup:] or self.times
        total = sum(timed)
        return {
            "warmup_steps": min(self.warmup, len(self.times)),
            "timed_steps": len(timed),
            "step_time_median_s": statistics.median(timed) if timed else None,
            "train_samples_per_s": self.samples / total if total and self.samples else None,
            "train_tokens_per_s": self.tokens / total if total and self.tokens else None,
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


# -- FLOPs and MFU ------------------------------------------------------------------------
# Model FLOPs (useful work, not what the hardware executed: padding, recomputation from
# gradient checkpointing and dequantization are not counted), after Kaplan et al. 2020 and
# the PaLM paper's MFU. Per token and matmul weight element: forward 2 FLOPs, backward 2 for
# the activation gradient and 2 for the weight gradient. Full fine-tuning: 6N. With frozen
# weights there is no weight gradient but the activation gradient still flows down to the
# lowest trainable parameter; for strategies with trainable parts in every layer (LoRA,
# IA3, adapters, prefix, BitFit) that is the whole network: 4N + 2N_trainable. (For `freeze`
# strategies that train only top layers this overestimates the backward a little.)
# Attention scores and the weighted sum are matmuls without weights: forward 4·d_attn FLOPs
# per (query, key) pair per layer, backward twice that.

ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "deberta", "deberta-v2", "albert", "mpnet"}


def matmul_params(model) -> tuple[int, int]:
    """(all, trainable) weight elements of the layers that do a matmul per token.

    By type: ``nn.Linear`` (bitsandbytes' 4/8-bit layers subclass it; counted unpacked) and
    GPT-2's ``Conv1D``. Embedding lookups are not matmuls; a tied LM head is an nn.Linear.
    """
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    total = trainable = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            n = m.in_features * m.out_features
        elif isinstance(m, Conv1D):
            n = m.weight.shape[0] * m.weight.shape[1]
        else:
            continue
        total += n
        if m.weight.requires_grad:
            trainable += n
    return total, trainable


def attention_dims(config) -> tuple[int, int]:
    """(layers, d_attn = query heads x head dim) from a transformers config."""
    layers = int(config.num_hidden_layers)
    heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return layers, heads * int(head_dim)


def is_causal(config) -> bool:
    return config.model_type not in ENCODER_TYPES and not getattr(config, "is_encoder_decoder", False)


def train_flops(n_matmul: int, n_trainable: int, tokens: float, sum_sq_len: float = 0.0, layers: int = 0,
                d_attn: int = 0, causal: bool = False) -> dict:
    """FLOPs of one training pass over ``tokens`` real tokens (see the note above).

    ``sum_sq_len`` = sum over sequences of length**2 (query-key pairs); causal attention
    counts half of them (only keys at or before the query).
    """
    pairs = sum_sq_len * (0.5 if causal else 1.0)
    attn_fwd = 4.0 * layers * d_attn * pairs
    fwd = 2.0 * n_matmul * tokens + attn_fwd
    bwd = 2.0 * n_matmul * tokens + 2.0 * n_trainable * tokens + 2.0 * attn_fwd
    return {"total": fwd + bwd, "forward": fwd, "backward": bwd, "attention": 3.0 * attn_fwd,
            "per_token": (fwd + bwd) / tokens if tokens else None,
            "matmul_params": n_matmul, "matmul_trainable": n_trainable}


def model_train_flops(model, lengths: list[int]) -> dict:
    """Training FLOPs for sequences of these real lengths through ``model`` (peft-wrapped or not)."""
    n, nt = matmul_params(model)
    cfg = getattr(model, "config", None) or model.get_base_model().config
    layers, d_attn = attention_dims(cfg)
    return train_flops(n, nt, float(sum(lengths)), float(sum(x * x for x in lengths)), layers, d_attn, is_causal(cfg))


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
