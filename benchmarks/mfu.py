"""Hardware efficiency: model FLOP/s achieved in training vs the measured matmul peak.

The peak is the best ``torch.matmul`` FLOP/s on large squares (bf16 and fp32, best of several)
on the same machine, in a fresh process with the same threading settings as training. Each
strategy in the registry trains builtin MiniLM on an SST-2 subset in its own process; model
FLOPs are counted live per training call (``peftkit.step.flops.FlopCounter``, the counter behind
result.json: real tokens, backward only where gradients flow, plus attention) and divided
by the time of the timed steps (``common.StepClock``, data loading included). MFU = achieved
/ peak of the autocast dtype.

    python benchmarks/mfu.py                       # every registered strategy
    python benchmarks/mfu.py --strategies full lora --precision bf16 fp32
    python benchmarks/mfu.py --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def matmul_peak(dtype, sizes, repeats: int) -> dict:
    """Best single ``torch.matmul`` FLOP/s over squares of these sizes (best of ``repeats`` each)."""
    from peftkit.step.flops import matmul_peak_flops

    per = {n: max(matmul_peak_flops("cpu", dtype, n, iters=1, warmup=int(r == 0)) for r in range(repeats))
           for n in sizes}
    return {"dtype": str(dtype).removeprefix("torch."), "flops_per_s": max(per.values()), "by_size": per,
            "repeats": repeats}


def worker_peak(spec: dict) -> dict:
    import torch

    sizes = tuple(spec["sizes"])
    return {"peaks": {p: matmul_peak({"bf16": torch.bfloat16, "fp32": torch.float32}[p], sizes, spec["repeats"])
                      for p in spec["precisions"]}, "torch_threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}


def worker_shapes(spec: dict) -> dict:
    """Matmul FLOP/s at one transformer layer's own training shapes: the ceiling for MFU.

    ``rows`` = padded tokens of a typical step. Per linear (in -> out): forward X[rows,in] @
    W[in,out], input gradient dY[rows,out] @ W^T, weight gradient X^T @ dY; four hidden x hidden
    linears (q, k, v, attention output) and the two feed-forward ones.
    """
    import torch
    from transformers import AutoConfig

    from peftkit.model.backbone import resolve

    cfg = AutoConfig.from_pretrained(resolve(spec["model"]))
    h, i, rows = cfg.hidden_size, cfg.intermediate_size, spec["rows"]
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[spec["precision"]]
    out = {}
    flops = secs = 0.0
    for k, n in [(h, h)] * 4 + [(h, i), (i, h)]:
        for m, kk, nn in ((rows, k, n), (rows, n, k), (k, rows, n)):  # forward, input grad, weight grad
            a, b = torch.randn(m, kk, dtype=dtype), torch.randn(kk, nn, dtype=dtype)
            torch.matmul(a, b)
            best = min(_timed(lambda: torch.matmul(a, b), spec["iters"]) for _ in range(spec["repeats"]))
            flops += 2.0 * m * kk * nn
            secs += best
            out[f"{m}x{kk}x{nn}"] = 2.0 * m * kk * nn / best
    return {"rows": rows, "hidden": h, "intermediate": i, "flops_per_s": flops / secs, "by_shape": out}


def _timed(fn, iters: int) -> float:
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def worker_train(spec: dict) -> dict:

    from peftkit import recipe as R
    from peftkit.model.build import build
    from peftkit.step.flops import FlopCounter
    from peftkit.training.trainer import Trainer

    rec = R.from_dict({
        "name": "mfu",
        "model": {"name": spec["model"]},
        "task": {"kind": "classification", "max_length": spec["max_length"], "text_column": "sentence",
                 "label_column": "label", "data": common.sst2_data_section(spec["n_train"], 32, Path(spec["data"]))},
        "strategy": {"name": spec["strategy"]},
        "train": {"seed": 0, "max_steps": spec["steps"], "batch_size": spec["batch"], "lr": 1e-4,
                  "precision": spec["precision"], "progress": False},
        "output": {"save_weights": False},
    })
    built = build(rec)
    data = built.task.datasets()
    built.task.datasets = lambda: data
    with tempfile.TemporaryDirectory() as d:
        trainer = Trainer(built, d)
        counter = FlopCounter(built.model)
        per_step: list[float] = []  # taken at StepClock's stamps: the same steps, none of other optimizers
        clock = common.StepClock(built.model, on_step=lambda: per_step.append(counter.take()))
        res = trainer.fit()
        clock.close()
        counter.close()
    sp = clock.summary(spec["warmup"])
    timed_flops = sum(per_step[sp["warmup_steps"]:])
    # The same counter in result.json, over the trainer's own timing (compute only, no data loading).
    out = {"trainer_flops_per_s": res["speed"].get("model_flops_per_s")}
    return {**out, "speed": sp, "model_flops_timed": timed_flops, "model_flops_per_s": timed_flops / sp["timed_s"],
            "flops_per_token": timed_flops / (sp["tokens_per_s"] * sp["timed_s"]),
            "linear_flops_share": counter.linear / max(1.0, counter.linear + counter.attention),
            "params": res["params"], "backbone": res["run"]["model"], "optimizer": rec.train.optimizer}


def run(args) -> dict:
    script = Path(__file__).resolve()
    t0 = time.time()
    peak = common.run_worker(script, {"kind": "peak", "precisions": args.precision, "sizes": args.sizes,
                                      "repeats": args.repeats}, env={"OMP_WAIT_POLICY": "PASSIVE"})
    for p, v in peak["peaks"].items():
        print(f"peak {p}: {v['flops_per_s'] / 1e9:.1f} GFLOP/s (best of {v['repeats']}, sizes {list(v['by_size'])})",
              flush=True)
    runs = []
    for rep in range(args.reps):
        for precision in args.precision:
            for strategy in args.strategies:
                spec = {"kind": "train", "model": args.model, "data": str(args.data), "strategy": strategy,
                        "precision": precision, "steps": args.steps, "warmup": args.warmup, "batch": args.batch,
                        "max_length": args.max_length, "n_train": args.n_train}
                try:
                    r = common.run_worker(script, spec)
                except RuntimeError as e:  # a strategy that cannot run here is reported, not fatal
                    print(f"{strategy} {precision}: failed: {str(e).splitlines()[-1]}", flush=True)
                    runs.append({"spec": spec, "rep": rep, "error": str(e)[-2000:]})
                    continue
                pk = peak["peaks"][precision]["flops_per_s"]
                r["mfu"] = r["model_flops_per_s"] / pk
                if r.get("trainer_flops_per_s"):
                    r["mfu_trainer"] = r["trainer_flops_per_s"] / pk
                runs.append({"spec": spec, "rep": rep, **r})
                print(f"{strategy:8s} {precision}: {r['model_flops_per_s'] / 1e9:7.1f} GFLOP/s = MFU {100 * r['mfu']:5.1f}% "
                      f"({r['speed']['tokens_per_s']:.0f} tok/s, {r['flops_per_token'] / 1e6:.1f} MFLOP/token, "
                      f"load {r['loadavg_after'][0]:.1f})", flush=True)
    # The ceiling: the same matmuls a layer runs, at the padded rows of a median step of the runs.
    ok = [r for r in runs if "error" not in r]
    shapes = {}
    if ok:
        sp = sorted(ok, key=lambda r: r["speed"]["padded_tokens_per_s"] / r["speed"]["samples_per_s"])[len(ok) // 2]["speed"]
        rows = max(1, round(args.batch * sp["padded_tokens_per_s"] / sp["samples_per_s"]))
        for precision in args.precision:
            shapes[precision] = common.run_worker(script, {"kind": "shapes", "model": args.model, "rows": rows,
                                                           "precision": precision, "iters": 20, "repeats": args.repeats},
                                                  env={"OMP_WAIT_POLICY": "PASSIVE"})
            v = shapes[precision]
            print(f"matmul at the layer's shapes ({rows} rows, {precision}): {v['flops_per_s'] / 1e9:.1f} GFLOP/s = "
                  f"{100 * v['flops_per_s'] / peak['peaks'][precision]['flops_per_s']:.1f}% of peak", flush=True)
    return {"schema": "peftkit.bench.mfu/1", "shapes": shapes, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "peak": peak, "runs": runs, "wall_s": time.time() - t0}


def markdown(data: dict, env: dict) -> str:
    a = data["args"]
    peaks = data["peak"]["peaks"]
    lines = ["# Training MFU on this machine (MiniLM, SST-2)", "",
             "Matmul peak (best `torch.matmul` of squares " + ", ".join(str(s) for s in a["sizes"]) + f", best of "
             f"{a['repeats']}): " + "; ".join(f"{p} {v['flops_per_s'] / 1e9:.1f} GFLOP/s" for p, v in peaks.items()) + ".",
             "", f"Training: builtin MiniLM, SST-2 subset of {a['n_train']} sentences, batch {a['batch']}, max length "
             f"{a['max_length']}, dynamic padding + length-grouped batches, {a['steps']} steps ({a['warmup']} warm-up "
             "excluded), model FLOPs counted per call by `peftkit.step.flops` (real tokens, backward where gradients flow, + "
             "attention). "
             "Median over repetitions."]
    for p, v in (data.get("shapes") or {}).items():
        pk = peaks[p]["flops_per_s"]
        lines += ["", f"Ceiling ({p}): the matmuls of one MiniLM layer at its own training shapes (forward, input and "
                  f"weight gradients; {v['rows']} rows = padded tokens of a median step; hidden {v['hidden']}, "
                  f"feed-forward {v['intermediate']}) run at {v['flops_per_s'] / 1e9:.1f} GFLOP/s = "
                  f"**{100 * v['flops_per_s'] / pk:.1f}% of the peak**: the MFU a training step could reach if it did "
                  "nothing but these matmuls, one per linear as transformers runs them (fusing q/k/v or a larger "
                  "batch makes them bigger)."]
    lines += ["",
             "| strategy | precision | trainable % | MFLOP/token | tokens/s | model GFLOP/s | MFU vs matmul peak | "
             "MFU by result.json (compute-only timing) | target |",
             "|---|---|---|---|---|---|---|---|---|"]
    groups: dict = {}
    for r in data["runs"]:
        groups.setdefault((r["spec"]["strategy"], r["spec"]["precision"]), []).append(r)
    for (strategy, precision), rs in groups.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            lines.append(f"| {strategy} | {precision} | – | – | – | – | – | failed: "
                         f"{rs[0]['error'].strip().splitlines()[-1][:80]} | |")
            continue
        med = lambda f: common.spread([f(r) for r in ok])["median"]  # noqa: E731
        mfu = med(lambda r: r["mfu"])
        tgt = ("≥30%: " + ("met" if mfu >= 0.3 else "missed")) if strategy == "full" else ""  # issue #16: of its precision's peak
        lines.append(f"| {strategy} | {precision} | {ok[0]['params']['trainable_pct']:.2f} | "
                     f"{med(lambda r: r['flops_per_token']) / 1e6:.1f} | {med(lambda r: r['speed']['tokens_per_s']):.0f} | "
                     f"{med(lambda r: r['model_flops_per_s']) / 1e9:.1f} | {100 * mfu:.1f}% | "
                     f"{common.fmt(100 * mm if (mm := med(lambda r: r.get('mfu_trainer'))) else None)}% | {tgt} |")
    lines += common.environment_section(data, env)
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--model", default="builtin:minilm")
    p.add_argument("--data", type=Path, default=common.SST2)
    p.add_argument("--strategies", nargs="+", default=None, help="default: every strategy in the registry")
    p.add_argument("--precision", nargs="+", default=["bf16"], choices=["bf16", "fp32"])
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--n-train", type=int, default=2048)
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=common.RESULTS)
    p.add_argument("--name", default="mfu", help="results file name (without extension)")
    p.add_argument("--smoke", action="store_true", help="tiny model and data, a few steps, nothing written")
    args = p.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        import peftkit  # noqa: F401  first, as in a user's program (threading defaults)

        common.quiet()
        work = {"peak": worker_peak, "shapes": worker_shapes, "train": worker_train}[spec["kind"]]
        common.emit(work(spec))
        return 0
    from peftkit import strategies

    args.strategies = args.strategies or list(strategies.REGISTRY)
    if args.smoke:
        model, data_dir = common.tiny_setup()
        args.model, args.data, args.n_train, args.steps, args.warmup = str(model), data_dir, 64, 4, 1
        args.batch, args.max_length, args.sizes, args.repeats, args.strategies = 8, 32, [256], 2, ["full", "lora"]
    common.run_and_publish(args, run, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
