"""The checks of benchmarks/gpu_check.py: one recipe, one in-process run and its numbers, the
variants (compiled, 4-bit, frozen weights in the compute dtype) and the scale-out runs.

Every function returns a plain dict (one row of gpu_check.json); gpu_check.py orders them,
keeps the time budget and records failures.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from peftkit.step import flops
from peftkit import recipe as R
from peftkit.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
BUCKET = 16  # compiled-vs-eager rows: train.pad_to_multiple_of, the trainer's default when compile is on


def recipe(model: str, strategy: str, a, *, attn: str, steps: int, save: bool, kind: str = "classification") -> dict:
    data = ({"dir": str(a.data), "train": "train.csv", "validation": "validation.csv", "test": "test.csv"}
            if a.data else {"source": "builtin:rotten-tomatoes"})
    data.update(max_train_samples=a.n_train, max_eval_samples=a.n_eval)
    task = {"kind": kind, "max_length": a.max_length, "data": data} if kind == "classification" else {"kind": kind}
    return {
        "name": f"gpu-check-{strategy}",
        "model": {"name": model, "attn_implementation": attn, "dtype": a.dtype},
        "task": task,
        "strategy": {"name": strategy},
        "train": {"max_steps": steps, "batch_size": a.batch_size, "lr": 1e-4, "precision": a.precision,
                  "progress": False, "log_every": 1, "warmup_ratio": 0.0},
        "output": {"save_weights": save, "report_to": []},
    }


class _TimedTrainer(Trainer):
    """The trainer, keeping every step's wall time (result.json keeps only the summary): the
    first steps hold compilation and warm-up, which the median leaves out."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.step_times: list[float] = []

    def _finish(self, run):
        self.step_times = list(run.meters.timer.times)
        return super()._finish(run)


def _estimate(mem: dict) -> dict:
    # The estimate memory.section compares: at the measured step's shape, else the run's planning one.
    at = mem.get("estimate_at_measured_shape")
    return at if at and "error" not in at else mem.get("estimate") or {}


def run(rd: dict, peak: float | None) -> dict:
    """Train + evaluate one recipe in this process; the numbers the tables need."""
    from peftkit.model.build import build

    from accelerate.state import AcceleratorState

    built = build(R.from_dict(rd))
    with tempfile.TemporaryDirectory() as d:
        try:
            trainer = _TimedTrainer(built, d)
            res = trainer.fit()
            trainer.acc.free_memory()  # drop accelerate's references before the next check
        finally:  # accelerate keeps one mixed precision per process: the next run may want another
            AcceleratorState._reset_state(True)
        saved = sorted(p.name for p in Path(d).iterdir())
        log = [json.loads(x) for x in (Path(d) / "log.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in log if "loss" in x]
    sp, mem = res["speed"], res["memory"]
    fps = sp.get("model_flops_per_s")  # peftkit.step.flops, counted live by the trainer (not when compiled)
    est, times, median = _estimate(mem), trainer.step_times, sp["step_time_median_s"]
    out = {
        "ok": bool(losses) and all(math.isfinite(x) for x in losses) and res["metrics"]["eval"]["examples"] > 0,
        "attn_implementation": res["run"]["model"].get("attn_implementation"),
        "quantization": res["run"]["model"].get("quantization"),
        "frozen_weights": res["run"].get("frozen_weights"),
        "params": res["params"],
        "eval": {k: v for k, v in res["metrics"]["eval"].items() if not k.startswith("eval_")},
        "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
        # Whole run: CUDA max_memory_allocated (CPU: RSS growth). Step: the probed step's peak, the
        # number the estimate is compared with (memory.section).
        "peak_bytes": mem["measured"].get("max_allocated_bytes", mem["measured"].get("peak_bytes")),
        "reserved_bytes": mem["measured"].get("max_reserved_bytes"),
        "step_peak_bytes": mem.get("peak_bytes"), "step_batch_shape": (mem["measured"].get("live") or {}).get("batch_shape"),
        "estimate_bytes": est.get("peak_bytes"), "estimate_error": mem["errors"]["estimate_vs_measured"],
        "estimate_at": est.get("seq_source"), "estimate_basis": mem["errors"]["basis"],
        "tokens_per_s": sp["train_tokens_per_s"], "samples_per_s": sp["train_samples_per_s"],
        "step_time_median_s": median, "warmup_steps": sp["warmup_steps"], "steps": sp["steps"],
        "first_step_s": times[0] if times else None, "step_times_head_s": times[:5],
        "warmup_s": sum(times[:sp["warmup_steps"]]),  # the steps the median leaves out
        # Everything outside the steady steps: compilation, warm-up, the memory probe, logging.
        "overhead_s": sp["train_s"] - len(times) * median if times and median else None,
        "train_s": sp["train_s"],
        "flops_per_token": sp.get("model_flops_per_token"), "model_flops_per_s": fps, "mfu": flops.mfu(fps, peak),
        "files": saved,
    }
    del built, res, trainer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def ratios(row: dict, ref: dict) -> dict:
    """``row`` against ``ref`` (same model, one setting changed): > 1 = row has more of it."""
    def q(k):
        x, y = row.get(k), ref.get(k)
        return x / y if isinstance(x, (int, float)) and isinstance(y, (int, float)) and y else None
    return {"tokens_per_s": q("tokens_per_s"), "step_time": q("step_time_median_s"),
            "peak": q("peak_bytes"), "step_peak": q("step_peak_bytes")}


# -- compiled vs eager ------------------------------------------------------------------------
@contextlib.contextmanager
def compile_backend(backend: str | None):
    """The trainer calls ``torch.compile(model)``; here with ``backend`` (the dry run: dynamo's
    capture without inductor's code generation, which takes minutes on a small CPU)."""
    original = torch.compile
    if backend is not None:
        torch.compile = functools.partial(original, backend=backend)
    try:
        yield
    finally:
        torch.compile = original


def bucketed_run(rd: dict, peak: float | None, compiled: bool, backend: str | None = None) -> dict:
    """One run with lengths padded to a multiple of BUCKET (a compiled step meets a few shapes,
    not one per batch), eager or compiled; dynamo is reset first (its caches would hide this
    model's compile time)."""
    import torch._dynamo as dynamo
    from torch._dynamo.utils import calculate_time_spent, counters

    rd["train"].update(pad_to_multiple_of=BUCKET, compile=compiled)
    fields = {"padding": f"multiple of {BUCKET}"}
    if not compiled:
        return {**run(rd, peak), **fields}
    dynamo.reset()
    counters.clear()
    before = calculate_time_spent().get("total_wall_time", 0.0)
    with compile_backend(backend):
        out = run(rd, peak)
    return {**out, **fields, "backend": backend or "inductor", "graphs": counters["stats"].get("unique_graphs"),
            "dynamo_compile_s": calculate_time_spent().get("total_wall_time", 0.0) - before}


def vs_eager(compiled: dict, eager: dict, peak: float | None) -> dict:
    """Steady speed-up; compile time (torch._dynamo's own clock, forward, backward and every
    recompile; beside it the compiled run's extra time outside the steady steps, which a stalled
    step on a busy machine also moves); the steps after which compiling has paid for itself;
    MFU at the eager run's FLOPs per token (the same arithmetic; the trainer counts no FLOPs on a
    compiled model)."""
    if not (compiled.get("ok") and eager.get("ok")):
        return {}
    cm, em = compiled["step_time_median_s"], eager["step_time_median_s"]
    extra = compiled["overhead_s"] - eager["overhead_s"]
    compile_s = compiled.get("dynamo_compile_s") or extra
    gain = em - cm
    fpt, tps = eager.get("flops_per_token"), compiled.get("tokens_per_s")
    return {**ratios(compiled, eager), "speedup": em / cm if cm else None, "compile_s": compile_s,
            "overhead_vs_eager_s": extra,
            "break_even_steps": math.ceil(compile_s / gain) if gain > 0 and compile_s > 0 else None,
            "mfu": flops.mfu(fpt * tps, peak) if fpt and tps else None}


# -- scale-out --------------------------------------------------------------------------------
def parallel_check(a, work: Path) -> dict:
    """Two compare runs at once through the local executor; each on its own GPU when there are two."""
    import yaml

    from peftkit.runs import compare

    work.mkdir(parents=True, exist_ok=True)
    f = work / "compare.yaml"
    base = recipe(a.encoder, "lora", a, attn="auto", steps=a.check_steps, save=False)
    f.write_text(yaml.safe_dump({"base": base, "variants": [
        {"name": "full", "set": {"strategy.name": "full"}}, {"name": "lora", "set": {}}]}))
    t0 = time.perf_counter()
    rc = compare.compare(f, work / "out", executor={"name": "local", "parallel": 2}, echo=lambda _: None)
    wall = time.perf_counter() - t0
    rows = json.loads((work / "out" / "compare.json").read_text())["runs"]
    runs = [{"variant": x["variant"], **x.get("execution", {})} for x in rows]
    seconds = sum(x.get("seconds", 0) for x in runs)
    return {"ok": rc == 0 and all(x.get("status") == "done" for x in runs), "runs": runs, "wall_s": wall,
            "sum_run_s": seconds, "overlap": seconds / wall if wall else None,
            "gpus": torch.cuda.device_count()}


def fsdp_check(a, work: Path, strategy: str) -> dict:
    """The same recipe in 1 process and in 2 FSDP2 processes (recipes/accelerate/fsdp.yaml): losses side by side."""
    import yaml

    rec = work / f"{strategy}.yaml"
    rd = recipe(a.encoder, strategy, a, attn="sdpa", steps=a.check_steps, save=True)
    rec.write_text(yaml.safe_dump(rd))
    cmd = [sys.executable, "-m", "peftkit", "train", str(rec), "--out"]
    fsdp = ["--launcher", "accelerate", "--nproc", "2", "--accelerate-config",
            str(ROOT / "recipes" / "accelerate" / "fsdp.yaml")]
    res, losses = {}, {}
    for n, extra in ((1, []), (2, fsdp)):
        d = work / f"{strategy}-{n}"
        p = subprocess.run(cmd + [str(d), *extra], capture_output=True, text=True, timeout=300, cwd=work)
        if p.returncode != 0:
            raise RuntimeError(f"{n} process(es): {(p.stderr or p.stdout).strip().splitlines()[-1]}")
        res[n] = json.loads((d / "result.json").read_text())
        losses[n] = [r["loss"] for r in map(json.loads, (d / "log.jsonl").read_text().splitlines()) if "loss" in r]
    diff = max(abs(x - y) for x, y in zip(losses[1], losses[2]))
    return {"ok": res[2]["run"]["distributed_type"] == "FSDP" and diff < 0.05, "losses_1": losses[1],
            "losses_2": losses[2], "max_abs_loss_diff": diff, "distributed_type": res[2]["run"]["distributed_type"],
            "peak_bytes_1": res[1]["memory"]["measured"]["peak_bytes"],
            "peak_bytes_2": res[2]["memory"]["measured"]["peak_bytes"]}
