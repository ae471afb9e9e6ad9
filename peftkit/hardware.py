"""What precision this machine runs fast: ``train.precision: auto`` and ``model.compute_dtype: auto``.

bf16 where the device computes it natively (a CUDA GPU with bf16; a CPU with AVX512-BF16 or
AMX whose kernels may use them), fp16 autocast on a CUDA GPU without bf16, fp32 elsewhere.
On a CPU a probe of a few milliseconds (one small bf16 and one fp32 matmul, once per
process) backs the decision and gives the slow-down factor when bf16 is not native: on an
AVX2-only EPYC a bf16 matmul is ~60x slower than fp32, a training step ~15x.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from peftkit.errors import UserError

# bf16 slower than this fraction of fp32 on a CPU whose flags say "native": the kernels are
# not using the bf16 units (e.g. ONEDNN_MAX_CPU_ISA=AVX2): fp32 is the faster choice.
MIN_NATIVE_FACTOR = 0.5
_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
_PROBE_N = 128  # 4.2 MFLOP a matmul: ~5 ms in bf16 at 0.8 GFLOP/s (AVX2), well under 1 ms in fp32


def cpu_flags() -> set[str] | None:
    """The kernel's CPU flags (Linux /proc/cpuinfo), None where it is not available."""
    for line in _cpuinfo_lines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return None


@functools.cache
def probe() -> dict:
    """GFLOP/s of one n x n matmul in bf16 and fp32 on the CPU (best of 3, after a warm-up)."""
    g = torch.Generator().manual_seed(0)
    a32 = torch.randn(_PROBE_N, _PROBE_N, generator=g)
    out = {"matmul_n": _PROBE_N}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = a32.to(dtype)
        a @ a  # warm-up: kernel selection, oneDNN primitive creation
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            a @ a
            best = min(best, time.perf_counter() - t0)
        out[f"{name}_gflops"] = round(2 * _PROBE_N**3 / max(best, 1e-9) / 1e9, 2)
    out["bf16_speed_factor"] = round(out["bf16_gflops"] / out["fp32_gflops"], 3)  # > 1: bf16 faster
    return out


@dataclass(frozen=True)
class Precision:
    requested: str
    resolved: str
    reason: str
    device: str
    probe: dict | None = field(default=None)
    warning: str | None = None

    @property
    def mixed_precision(self) -> str:
        """accelerate's name for the autocast."""
        return "no" if self.resolved == "fp32" else self.resolved

    def record(self) -> dict:
        return {"requested": self.requested, "resolved": self.resolved, "reason": self.reason,
                "device": self.device, "probe": self.probe}

    def line(self) -> str:
        factor = f"; probe bf16/fp32 speed {self.probe['bf16_speed_factor']:g}x" if self.probe else ""
        return f"precision {self.resolved} (requested {self.requested}: {self.reason}{factor})"


def _cuda() -> tuple[str, str]:
    cap = ".".join(map(str, torch.cuda.get_device_capability()))
    name = torch.cuda.get_device_name()
    if torch.cuda.is_bf16_supported(including_emulation=False):
        return "bf16", f"CUDA {name} (compute capability {cap}) has native bf16"
    return "fp16", f"CUDA {name} (compute capability {cap}) has no native bf16: fp16 autocast"


def cpu_native_bf16() -> tuple[bool, str]:
    """(native, why) from torch's kernel level (honours ATEN_CPU_CAPABILITY) and the CPU flags."""
    cap = torch.backends.cpu.get_cpu_capability()
    flags = cpu_flags()
    have = sorted(set(_BF16_FLAGS) & flags) if flags is not None else []
    if not cap.startswith("AVX512"):
        return False, f"CPU kernels at {cap} (no AVX-512 bf16 path)"
    if flags is None:
        return True, f"CPU kernels at {cap}, CPU flags unknown"
    if not have:
        return False, f"CPU kernels at {cap} but no {'/'.join(_BF16_FLAGS)} flag"
    return True, f"CPU kernels at {cap} with {'+'.join(have)}"


def _cpu() -> tuple[str, str, dict]:
    native, why = cpu_native_bf16()
    p = probe()
    if native and p["bf16_speed_factor"] < MIN_NATIVE_FACTOR:
        return "fp32", f"{why}, but bf16 matmul measured {p['bf16_speed_factor']:g}x fp32 speed", p
    return ("bf16", why, p) if native else ("fp32", why, p)


@functools.cache
def resolve(requested: str = "auto", device: str | None = None) -> Precision:
    """Resolve a precision name for ``device`` (default: CUDA when available, else CPU); cached."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        best, why = _cuda()
        if requested == "auto":
            return Precision(requested, best, why, device)
        return Precision(requested, requested, "as requested", device)
    if requested == "fp32":
        return Precision(requested, "fp32", "as requested", device)
    if requested == "fp16":
        raise UserError("train.precision: fp16 autocast needs a CUDA GPU; use auto, bf16 or fp32 on CPU")
    best, why, p = _cpu()
    if requested == "auto":
        return Precision(requested, best, why, device, p)
    warning = None
    if requested == "bf16" and best != "bf16":
        warning = (f"bf16 requested but not native on this CPU ({why}): a bf16 matmul measured "
                   f"{1 / max(p['bf16_speed_factor'], 1e-9):.0f}x slower than fp32; train.precision=auto picks fp32")
    return Precision(requested, requested, "as requested", device, p, warning)


def for_run(recipe, warn=None) -> Precision:
    """The trainer's one call: the run's precision, with the one warning line when it is slow."""
    prec = resolve(recipe.train.precision)
    slow = prec.warning or _storage_warning(recipe)
    if slow and warn is not None:
        warn(slow)
    return prec


def _storage_warning(recipe) -> str | None:
    if recipe.model.dtype != "bf16" or torch.cuda.is_available() or resolve("auto").resolved == "bf16":
        return None
    f = probe()["bf16_speed_factor"]
    return f"model.dtype bf16 on a CPU without native bf16: a bf16 matmul measured {1 / max(f, 1e-9):.0f}x slower than fp32"


def compute_dtype(recipe) -> str:
    """4-bit layers' compute dtype: ``auto`` follows the run's resolved precision."""
    cd = recipe.model.compute_dtype
    return resolve(recipe.train.precision).resolved if cd == "auto" else cd


def frozen_dtype(recipe) -> torch.dtype | None:
    """The dtype frozen weights are stored in for this run (``model.frozen_dtype``), None = as loaded:
    the autocast dtype when the run trains under bf16/fp16 autocast over fp32 weights."""
    prec = resolve(recipe.train.precision).resolved
    if recipe.model.frozen_dtype != "auto" or prec == "fp32" or recipe.model.dtype != "fp32":
        return None
    return torch.bfloat16 if prec == "bf16" else torch.float16


def pin_precision(recipe):
    """The recipe with ``train.precision`` resolved for this machine."""
    prec = resolve(recipe.train.precision).resolved
    return recipe.model_copy(update={"train": recipe.train.model_copy(update={"precision": prec})})


def pinned(recipe):
    """The recipe with every ``auto`` precision resolved (for building and estimating)."""
    model = recipe.model.model_copy(update={"compute_dtype": compute_dtype(recipe)})
    return pin_precision(recipe).model_copy(update={"model": model})


def describe() -> dict:
    """The machine as CI logs should show it: CPU model, bf16-relevant flags, what auto resolves to."""
    flags = cpu_flags()
    model = next((ln.split(":", 1)[1].strip() for ln in _cpuinfo_lines() if ln.startswith("model name")), None)
    simd = sorted(f for f in flags or () if f.startswith(("avx", "amx", "fma", "sse4")))
    return {"cpu": model, "simd_flags": simd, "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "auto": resolve("auto").record()}


def _cpuinfo_lines() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace").splitlines()
    except OSError:
        return []


if __name__ == "__main__":
    import json

    print(json.dumps(describe(), indent=2))
