#!/usr/bin/env python
"""GPU check: every registered strategy trains a few steps and evaluates; then, for builtin
MiniLM and SmolLM2, peak memory against the trainer's estimate, tokens/s and MFU (against a
measured bf16 matmul peak) with FlashAttention-2 on (when flash-attn imports) and off (SDPA),
qlora (bitsandbytes 4-bit) against lora, padding-free causal-LM batches, the compiled training
step against eager (compile time apart from steady steps) and frozen weights stored in the
compute dtype against fp32; then scale-out: two compare runs at once (``--parallel 2``, one GPU
each, or sharing one GPU) and FSDP2 over 2 GPUs against one process (when >= 2 GPUs are visible).

    python benchmarks/gpu_check.py                  # CUDA machine; no check starts after --budget-s (450 s)
    python benchmarks/gpu_check.py --dry-run --encoder DIR --decoder DIR --data DIR --out DIR

Writes OUT/gpu_check.json and OUT/gpu_check.md (default OUT: benchmarks/results/) after every
check, so a crash or the time budget loses nothing already measured. Each check is isolated
in try/except: a failure is recorded with its error and the rest still runs.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import importlib.util
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts this checkout's peftkit first on the path)
import torch  # noqa: E402

import gpu_checks as G  # noqa: E402
from gpu_check_table import markdown  # noqa: E402
from peftkit.step import flops
from peftkit import recipe as R, strategies, tasks  # noqa: E402

SCHEMA = "peftkit.gpu_check/1"


def environment() -> dict:
    env = common.environment()  # versions, CPU model, torch threads, load average at start
    env["cuda"] = torch.version.cuda
    for name in ("flash-attn", "deepspeed", "bitsandbytes"):
        try:
            env["versions"][name] = md.version(name)
        except md.PackageNotFoundError:
            env["versions"][name] = None
    if torch.cuda.is_available():
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        env["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
    return env


def cpu_s() -> float:
    """CPU seconds of this process and its finished children: beside wall time, it shows a busy machine."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class Checks:
    """The record being built; every check goes through ``attempt``: timed, isolated, saved."""

    def __init__(self, a, dry: bool):
        self.a, self.t0 = a, time.perf_counter()
        self.r = {"schema": SCHEMA, "dry_run": dry, "env": environment(), "budget_s": a.budget_s, "elapsed_s": 0.0,
                  "matmul_dtype": "bfloat16", "peak_matmul_flops": None, "checks": [], "bench": [], "compile": [],
                  "frozen": [], "scale": []}

    def save(self):
        self.r["elapsed_s"], self.r["cpu_s"] = time.perf_counter() - self.t0, cpu_s()
        self.r["env"]["loadavg_end"] = os.getloadavg()
        (self.a.out / "gpu_check.json").write_text(json.dumps(self.r, indent=2) + "\n")
        (self.a.out / "gpu_check.md").write_text(markdown(self.r))

    def attempt(self, section: str, rec: dict, fn) -> dict:
        self.r[section].append(rec)
        t, cpu = time.perf_counter(), cpu_s()
        if t - self.t0 > self.a.budget_s:
            rec.update(ok=False, error="skipped: time budget spent")
        else:
            try:
                rec.update(fn())
            except Exception as e:  # one failure must not lose the other checks
                rec.update(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}",
                           traceback=traceback.format_exc(limit=6))
        rec["seconds"], rec["cpu_s"] = round(time.perf_counter() - t, 2), round(cpu_s() - cpu, 2)
        self.save()
        print(f"[gpu_check] {json.dumps({k: v for k, v in rec.items() if k not in ('traceback', 'params', 'files')})}",
              flush=True)
        return rec

    def skip(self, section: str, rec: dict, why: str) -> None:
        self.r[section].append({**rec, "ok": None, "error": f"skipped: {why}"})


def correctness(c: Checks, peak) -> None:
    a = c.a
    for name in a.strategies or list(strategies.REGISTRY):
        c.attempt("checks", {"strategy": name, "model": a.encoder},
                  lambda: G.run(G.recipe(a.encoder, name, a, attn="auto", steps=a.check_steps, save=True), peak))


def bench(c: Checks, peak, attns: list[str]) -> None:
    """Both models: strategies x attention implementations, then qlora against lora (SDPA)."""
    a = c.a
    for model in (a.encoder, a.decoder):
        for strat in a.bench_strategies:
            for attn in attns:
                c.attempt("bench", {"model": model, "strategy": strat, "attn": attn},
                          lambda: G.run(G.recipe(model, strat, a, attn=attn, steps=a.bench_steps, save=False), peak))
        lora = next((b for b in c.r["bench"] if b["model"] == model and b["strategy"] == "lora" and b["attn"] == "sdpa"), {})

        def qlora(model=model, lora=lora):
            q = G.run(G.recipe(model, "qlora", a, attn="sdpa", steps=a.bench_steps, save=False), peak)
            ref = {k: lora.get(k) for k in ("tokens_per_s", "peak_bytes", "step_peak_bytes")}
            return {**q, "lora": ref, "vs_lora": G.ratios(q, lora) if lora.get("ok") else {}}

        c.attempt("bench", {"model": model, "strategy": "qlora", "attn": "sdpa"}, qlora)


def padding_free(c: Checks, peak, attn: str) -> None:
    """Padding-free causal-LM batches need the causal-LM task (and its data: not in the dry run)."""
    a = c.a
    for pf in (False, True):
        def lm(pf=pf):
            rd = G.recipe(a.decoder, "lora", a, attn=attn, steps=a.bench_steps, save=False, kind="causal_lm")
            rd["train"]["padding_free"] = pf
            return G.run(rd, peak)

        c.attempt("bench", {"model": a.decoder, "strategy": "lora", "attn": attn, "task": "causal_lm",
                            "padding_free": pf}, lm)


def compiled(c: Checks, peak) -> None:
    """LoRA eager, then compiled, on the same bucketed batches."""
    a = c.a
    for model in a.variant_models:
        def rd(model=model):
            return G.recipe(model, "lora", a, attn="sdpa", steps=a.compile_steps, save=False)

        eager = c.attempt("compile", {"model": model, "strategy": "lora", "compile": False},
                          lambda: G.bucketed_run(rd(), peak, compiled=False))

        def comp(eager=eager):
            row = G.bucketed_run(rd(), peak, compiled=True, backend=a.compile_backend)
            return {**row, "vs_eager": G.vs_eager(row, eager, peak)}

        c.attempt("compile", {"model": model, "strategy": "lora", "compile": True}, comp)


def frozen(c: Checks, peak) -> None:
    """LoRA over fp32 weights under bf16 autocast: frozen weights kept fp32, then stored in bf16."""
    a = c.a
    for model in a.variant_models:
        keep = None
        for value in ("keep", "auto"):
            rec = {"model": model, "strategy": "lora", "frozen_dtype": value}
            if "frozen_dtype" not in R.ModelConfig.model_fields:
                c.skip("frozen", rec, "this peftkit has no model.frozen_dtype")
                continue

            def fit(value=value, keep=keep):
                rd = G.recipe(model, "lora", a, attn="sdpa", steps=a.bench_steps, save=False)
                rd["model"].update(dtype="fp32", frozen_dtype=value)
                rd["train"]["precision"] = "bf16"
                row = G.run(rd, peak)
                return {**row, "vs_keep": G.ratios(row, keep) if keep and keep.get("ok") else {}}

            keep = c.attempt("frozen", rec, fit)


def scale_out(c: Checks) -> None:
    work = Path(tempfile.mkdtemp(prefix="gpu-check-scale-"))
    c.attempt("scale", {"check": "parallel"}, lambda: G.parallel_check(c.a, work / "parallel"))
    for strat in ("full", "lora"):
        if torch.cuda.device_count() >= 2:
            c.attempt("scale", {"check": f"fsdp2-{strat}"}, lambda: G.fsdp_check(c.a, work, strat))
        else:
            c.skip("scale", {"check": f"fsdp2-{strat}"}, f"FSDP needs >= 2 CUDA GPUs ({torch.cuda.device_count()} visible)")


def settings(a, dry: bool) -> None:
    """The sizes of a real run, or of the dry run (tiny models on CPU, seconds per check)."""
    a.dtype, a.precision = ("fp32", "fp32") if dry else ("bf16", "bf16")
    a.batch_size, a.max_length = (4, 32) if dry else (32, 128)
    a.n_train, a.n_eval = (16, 8) if dry else (2048, 256)
    a.check_steps, a.bench_steps = (2, 3) if dry else (8, 40)
    a.compile_steps = 6 if dry else 40  # dry: one warm-up step (the compiling one) left out of the median
    # Dry run: dynamo's graph capture only; inductor's C++ code generation takes ~2 min a model on 2 cores.
    a.compile_backend = "eager" if dry else None
    a.bench_strategies = ["lora"] if dry else ["full", "lora"]
    # Compiled and frozen-dtype rows: the dry run checks their code once (the decoder's rows add ~15 s).
    a.variant_models = [a.encoder] if dry else [a.encoder, a.decoder]
    if dry:
        # Tiny models gain nothing from threads, and on a shared CPU a second OpenMP thread made
        # steps 20-100x slower (1.5 s instead of 15 ms: threads waiting on a busy core).
        torch.set_num_threads(1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny models, a couple of steps (tests)")
    p.add_argument("--encoder", default="builtin:minilm")
    p.add_argument("--decoder", default="builtin:smollm2")
    p.add_argument("--data", type=Path, help="directory with train/validation/test.csv (default: builtin data)")
    p.add_argument("--out", type=Path, default=common.RESULTS)
    p.add_argument("--budget-s", type=float, default=450.0, help="stop starting new checks after this")
    p.add_argument("--strategies", nargs="*", help="default: every registered strategy")
    a = p.parse_args(argv)
    cuda, dry = torch.cuda.is_available(), a.dry_run
    if not cuda and not dry:
        print("gpu_check: no CUDA device; use --dry-run for the CPU smoke mode", file=sys.stderr)
        return 2
    settings(a, dry)
    a.out.mkdir(parents=True, exist_ok=True)
    c = Checks(a, dry)
    try:
        n, iters = (256, 3) if dry else (8192, 100)
        c.r["peak_matmul_flops"] = flops.matmul_peak_flops("cuda" if cuda else "cpu", torch.bfloat16, n, iters)
    except Exception as e:
        c.r["peak_error"] = f"{type(e).__name__}: {e}"
    c.save()
    peak = c.r["peak_matmul_flops"]
    flash = cuda and importlib.util.find_spec("flash_attn") is not None
    attns = ["sdpa"] + (["flash_attention_2"] if flash else []) + (["eager"] if dry else [])

    # Issue #16's levers (compile, frozen dtype) before the checks earlier rounds already ran:
    # what the budget leaves out is recorded as skipped.
    correctness(c, peak)
    bench(c, peak, attns)
    compiled(c, peak)
    frozen(c, peak)
    if "causal_lm" in tasks.REGISTRY and not dry:
        padding_free(c, peak, attns[-1])
    scale_out(c)
    c.save()
    print(markdown(c.r))
    r = c.r
    failed = [x for k in ("checks", "bench", "compile", "frozen", "scale") for x in r[k] if x.get("ok") is False]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
