#!/usr/bin/env python
"""GPU check: every registered strategy trains a few steps and evaluates; then peak memory,
tokens/s and MFU (against a measured bf16 matmul peak) for builtin MiniLM and SmolLM2 with
FlashAttention-2 on (when flash-attn imports) and off (SDPA); then scale-out: two compare runs
at once (``--parallel 2``, one GPU each, or sharing one GPU) and FSDP2 over 2 GPUs against
one process (when >= 2 GPUs are visible).

    python benchmarks/gpu_check.py                  # CUDA machine, ~5 min on one H200
    python benchmarks/gpu_check.py --dry-run --encoder DIR --decoder DIR --data DIR --out DIR

Writes OUT/gpu_check.json and OUT/gpu_check.md (default OUT: benchmarks/results/) after every
check, so a crash or the time budget loses nothing already measured. Each check is isolated
in try/except: a failure is recorded with its error and the rest still runs.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata as md
import importlib.util
import json
import math
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from peftkit import flops, provenance, strategies, tasks  # noqa: E402

SCHEMA = "peftkit.gpu_check/1"


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
        "output": {"save_weights": save},
    }


def run(rd: dict, peak: float | None) -> dict:
    """Train + evaluate one recipe in this process; the numbers the tables need."""
    from peftkit import recipe as R
    from peftkit.build import build
    from peftkit.trainer import Trainer

    built = build(R.from_dict(rd))
    with tempfile.TemporaryDirectory() as d:
        trainer = Trainer(built, d)
        res = trainer.fit()
        trainer.acc.free_memory()  # drop accelerate's references before the next check
        saved = sorted(p.name for p in Path(d).iterdir())
        log = [json.loads(x) for x in (Path(d) / "log.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in log if "loss" in x]
    tps = res["speed"]["train_tokens_per_s"]
    fps = res["speed"].get("model_flops_per_s")  # peftkit.flops, counted live by the trainer
    mem = res["memory"]["measured"]
    out = {
        "ok": bool(losses) and all(math.isfinite(x) for x in losses) and res["metrics"]["eval"]["examples"] > 0,
        "attn_implementation": res["run"]["model"].get("attn_implementation"),
        "quantization": res["run"]["model"].get("quantization"),
        "params": res["params"],
        "eval": {k: v for k, v in res["metrics"]["eval"].items() if not k.startswith("eval_")},
        "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
        "peak_bytes": mem.get("max_allocated_bytes", mem.get("peak_bytes")),
        "reserved_bytes": mem.get("max_reserved_bytes"),
        "tokens_per_s": tps, "samples_per_s": res["speed"]["train_samples_per_s"],
        "step_time_median_s": res["speed"]["step_time_median_s"],
        "flops_per_token": res["speed"].get("model_flops_per_token"), "model_flops_per_s": fps, "mfu": flops.mfu(fps, peak),
        "files": saved,
    }
    del built, res, trainer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def parallel_check(a, work: Path) -> dict:
    """Two compare runs at once through the local executor; each on its own GPU when there are two."""
    import yaml

    from peftkit import compare

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
    import subprocess

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


def environment() -> dict:
    env = provenance.environment()
    env["cuda"] = torch.version.cuda
    for name in ("flash-attn", "deepspeed"):
        try:
            env["versions"][name] = md.version(name)
        except md.PackageNotFoundError:
            env["versions"][name] = None
    if torch.cuda.is_available():
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        env["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
    return env


def mib(b):
    return f"{b / 2**20:,.0f}" if b else "–"


def num(x, fmt):
    return format(x, fmt) if isinstance(x, (int, float)) else "–"


def markdown(r: dict) -> str:
    pk = r.get("peak_matmul_flops")
    lines = [f"# GPU check{' (dry run: tiny models, CPU)' if r['dry_run'] else ''}", "",
             f"- device: {r['env'].get('device_name')} · torch {r['env']['versions'].get('torch')} · "
             f"transformers {r['env']['versions'].get('transformers')} · flash-attn "
             f"{r['env']['versions'].get('flash-attn') or 'not installed'} · CUDA {r['env'].get('cuda')}",
             f"- measured {r['matmul_dtype']} matmul peak: {num(pk and pk / 1e12, '.1f')} TFLOP/s"
             + (f" ({r['peak_error']})" if r.get("peak_error") else ""),
             f"- elapsed {r['elapsed_s']:.0f} s of a {r['budget_s']:.0f} s budget", "",
             "## Correctness: every strategy trains and evaluates", "",
             "| strategy | model | ok | eval | loss first → last | peak MiB | error |", "|---|---|---|---|---|---|---|"]
    for c in r["checks"]:
        ev = ", ".join(f"{k} {v:.3f}" for k, v in (c.get("eval") or {}).items() if isinstance(v, float))
        lines.append(f"| {c['strategy']} | {c['model']} | {'yes' if c.get('ok') else 'NO'} | {ev} | "
                     f"{num(c.get('loss_first'), '.4f')} → {num(c.get('loss_last'), '.4f')} | "
                     f"{mib(c.get('peak_bytes'))} | {c.get('error', '')} |")
    lines += ["", "## Scale-out", "", "| check | ok | detail | error |", "|---|---|---|---|"]
    for c in r.get("scale", []):
        detail = (f"{c.get('overlap') or 0:.2f}x overlap; " + "; ".join(f"{x['variant']} on {x.get('where')}"
                                                                     for x in c.get("runs", []))
                  if c["check"] == "parallel" else f"max abs loss diff {num(c.get('max_abs_loss_diff'), '.2e')}")
        ok = "skipped" if c.get("ok") is None else "yes" if c["ok"] else "NO"
        lines.append(f"| {c['check']} | {ok} | {detail} | {c.get('error', '')} |")
    lines += ["", "## Speed and memory", "",
              "MFU = model FLOPs/s (peftkit.flops, result.json `speed.model_flops_per_s`: matmuls on real "
              "(non-padding) tokens, backward only where gradients flow, plus attention) over the measured "
              "matmul peak. Tokens are real (non-padding) tokens.", "",
              "| model | strategy | attention | peak MiB | tokens/s | TFLOP/s | MFU | error |",
              "|---|---|---|---|---|---|---|---|"]
    for b in r["bench"]:
        tflops = b.get("model_flops_per_s") and b["model_flops_per_s"] / 1e12
        mfu = f"{100 * b['mfu']:.3g}%" if b.get("mfu") else "–"
        lines.append(f"| {b['model']} | {b['strategy']} | {b['attn']} | {mib(b.get('peak_bytes'))} | "
                     f"{num(b.get('tokens_per_s'), ',.0f')} | {num(tflops, '.2f')} | {mfu} | {b.get('error', '')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny models, a couple of steps (tests)")
    p.add_argument("--encoder", default="builtin:minilm")
    p.add_argument("--decoder", default="builtin:smollm2")
    p.add_argument("--data", type=Path, help="directory with train/validation/test.csv (default: builtin data)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--budget-s", type=float, default=450.0, help="stop starting new checks after this")
    p.add_argument("--strategies", nargs="*", help="default: every registered strategy")
    a = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not a.dry_run:
        print("gpu_check: no CUDA device; use --dry-run for the CPU smoke mode", file=sys.stderr)
        return 2
    dry = a.dry_run
    a.dtype, a.precision = ("fp32", "fp32") if dry else ("bf16", "bf16")
    a.batch_size, a.max_length = (4, 32) if dry else (32, 128)
    a.n_train, a.n_eval = (16, 8) if dry else (2048, 256)
    check_steps, bench_steps = (2, 3) if dry else (8, 40)
    a.check_steps = check_steps
    t0 = time.perf_counter()
    a.out.mkdir(parents=True, exist_ok=True)
    r = {"schema": SCHEMA, "dry_run": dry, "env": environment(), "budget_s": a.budget_s, "elapsed_s": 0.0,
         "matmul_dtype": "bfloat16", "peak_matmul_flops": None, "checks": [], "bench": [], "scale": []}

    def save():
        r["elapsed_s"] = time.perf_counter() - t0
        (a.out / "gpu_check.json").write_text(json.dumps(r, indent=2) + "\n")
        (a.out / "gpu_check.md").write_text(markdown(r))

    def attempt(rec: dict, fn):
        if time.perf_counter() - t0 > a.budget_s:
            rec.update(ok=False, error="skipped: time budget spent")
        else:
            try:
                rec.update(fn())
            except Exception as e:  # one failure must not lose the other checks
                rec.update(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}",
                           traceback=traceback.format_exc(limit=6))
        save()
        print(f"[gpu_check] {json.dumps({k: v for k, v in rec.items() if k not in ('traceback', 'params', 'files')})}",
              flush=True)

    try:
        n, iters = (256, 3) if dry else (8192, 100)
        r["peak_matmul_flops"] = flops.matmul_peak_flops("cuda" if cuda else "cpu", torch.bfloat16, n, iters)
    except Exception as e:
        r["peak_error"] = f"{type(e).__name__}: {e}"
    save()

    for name in a.strategies or list(strategies.REGISTRY):
        rec = {"strategy": name, "model": a.encoder}
        r["checks"].append(rec)
        attempt(rec, lambda: run(recipe(a.encoder, name, a, attn="auto", steps=check_steps, save=True),
                                 r["peak_matmul_flops"]))

    flash = cuda and importlib.util.find_spec("flash_attn") is not None
    attns = ["sdpa"] + (["flash_attention_2"] if flash else []) + (["eager"] if dry else [])
    bench_strategies = ["lora"] if dry else ["full", "lora"]
    for model in (a.encoder, a.decoder):
        for strat in bench_strategies:
            for attn in attns:
                rec = {"model": model, "strategy": strat, "attn": attn}
                r["bench"].append(rec)
                attempt(rec, lambda: run(recipe(model, strat, a, attn=attn, steps=bench_steps, save=False),
                                         r["peak_matmul_flops"]))
    # Padding-free causal-LM batches need the causal-LM task; measured when it is registered.
    if "causal_lm" in tasks.REGISTRY and not dry:
        for pf in (False, True):
            rec = {"model": a.decoder, "strategy": "lora", "attn": attns[-1], "task": "causal_lm", "padding_free": pf}
            r["bench"].append(rec)

            def lm(pf=pf):
                rd = recipe(a.decoder, "lora", a, attn=attns[-1], steps=bench_steps, save=False, kind="causal_lm")
                rd["train"]["padding_free"] = pf
                return run(rd, r["peak_matmul_flops"])

            attempt(rec, lm)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-scale-"))
    rec = {"check": "parallel"}
    r["scale"].append(rec)
    attempt(rec, lambda: parallel_check(a, work / "parallel"))
    for strat in ("full", "lora"):
        rec = {"check": f"fsdp2-{strat}"}
        r["scale"].append(rec)
        if torch.cuda.device_count() >= 2:
            attempt(rec, lambda: fsdp_check(a, work, strat))
        else:
            rec.update(ok=None, error=f"skipped: FSDP needs >= 2 CUDA GPUs ({torch.cuda.device_count()} visible)")
    save()
    print(markdown(r))
    failed = [c for c in r["checks"] + r["bench"] + r["scale"] if c.get("ok") is False]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
