"""Each speed lever of peftkit's training run alone: on/off against the defaults, side by side.

Same run as ``vs_hf_trainer.py --settings identical --epoch`` (MiniLM, a fixed SST-2 subset,
one epoch, precision auto), peftkit only; every variant changes ONE thing. Variants alternate
within each repetition, each run in a fresh process. Reported per variant: start-up (process
start to the first training forward), training phase (first forward to last optimizer step),
steady tokens/s (after the warm-up steps) and their ratio to the defaults, paired by repetition.

    python benchmarks/speed_ablation.py                      # writes benchmarks/results/speed_ablation.*
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/speed_ablation.py --name speed_ablation_avx2
    python benchmarks/speed_ablation.py --smoke              # seconds, tiny model, nothing written
"""

from __future__ import annotations

import vs_hf_trainer  # first: its T_PROCESS is this process's start  # noqa: I001

import argparse
import contextlib
import json
import sys
from pathlib import Path

import common

# name -> (what it changes, spec overrides, patch applied in the worker before anything is built)
VARIANTS = {
    "defaults": ("peftkit as shipped", {}, None),
    "row_reads": ("data columns read row by row (the start-up before this round's fix)", {}, "row_reads"),
    "no_flops": ("no live model-FLOP counter", {}, "no_flops"),
    "no_probe": ("no live-memory probe of step 2", {}, "no_probe"),
    "no_estimate": ("no fake-tensor memory estimate (before and after training)", {}, "no_estimate"),
    "frozen_keep": ("model.frozen_dtype keep (frozen weights re-cast by autocast every step)",
                    {"model_extra": {"frozen_dtype": "keep"}}, None),
    "foreach_adamw": ("AdamW foreach instead of fused", {"train_extra": {"optimizer": "adamw_foreach"}}, None),
    "no_clip": ("no gradient-norm clipping (changes training: for the cost only)",
                {"train_extra": {"max_grad_norm": None}}, None),
    "random_batches": ("random batches instead of length-grouped (more padding)",
                       {"train_extra": {"group_by_length": False}}, None),
    "compile": ("train.compile (torch.compile, inductor); compile time is in the training phase",
                {"train_extra": {"compile": True}}, None),
}


def patch(name: str | None) -> None:
    if name == "row_reads":
        from peftkit.tasks import base, classification, data

        def lazy(ds, names):  # what ds[col] gives in datasets 5: a lazy Column, indexed row by row
            return {k: ds[k] for k in dict.fromkeys(names)}
        data.columns = base.columns = classification.columns = lazy
    elif name == "no_flops":
        from peftkit.training import meters

        meters._flop_counter = lambda model: None
    elif name == "no_probe":
        from peftkit.step import memory

        memory.StepPeak.around = lambda self, *a, **k: contextlib.nullcontext()
    elif name == "no_estimate":
        from peftkit.training.meters import Meters

        Meters._estimate = lambda self, **kw: {"error": "skipped (speed ablation)"}


def run(args) -> dict:
    from peftkit import hardware

    precision = hardware.resolve("auto").resolved
    steps = -(-args.n_train // args.batch)
    base = dict(tool="peftkit", setting="identical", model=args.model, data=str(args.data), n_train=args.n_train,
                batch=args.batch, max_length=args.max_length, warmup_ratio=0.06, seed=0, precision=precision,
                strategy=args.strategy, lr=args.lr, steps=steps, warmup=args.warmup, eval=False)
    names = [n for n in VARIANTS if n in args.variants]
    runs = []
    for rep in range(args.reps):
        order = names if rep % 2 == 0 else names[::-1]  # no variant always first or last
        for name in order:
            if name == "compile" and rep >= args.compile_reps:
                continue
            spec = {**base, **VARIANTS[name][1], "variant": name}
            r = common.run_worker(Path(__file__).resolve(), spec, env={"OMP_WAIT_POLICY": "PASSIVE"})
            runs.append({"variant": name, "rep": rep, **r})
            ph = r["phases"]
            print(f"rep {rep} {name:15s} start-up {ph['startup_s']:5.1f} s  training {ph['epoch_s']:5.1f} s  "
                  f"{r['speed']['tokens_per_s']:7.0f} tok/s (load {r['loadavg_after'][0]:.2f})", flush=True)
    return {"schema": "peftkit.bench.speed_ablation/1", "precision": precision, "steps": steps,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "runs": runs, "summary": summarize(runs)}


def summarize(runs: list[dict]) -> dict:
    by = {(r["variant"], r["rep"]): r for r in runs}
    out = {}
    for name in dict.fromkeys(r["variant"] for r in runs):
        pairs = [(by[(name, k)], by[("defaults", k)]) for v, k in by if v == name and ("defaults", k) in by]
        row = {"what": VARIANTS[name][0], "reps": len(pairs)}
        for key, get in (("startup_s", lambda r: r["phases"]["startup_s"]), ("epoch_s", lambda r: r["phases"]["epoch_s"]),
                         ("tokens_per_s", lambda r: r["speed"]["tokens_per_s"])):
            row[key] = common.spread([get(a) for a, _ in pairs])
            row[key + "_vs_defaults"] = common.spread([get(a) / get(b) for a, b in pairs if get(b)])
        out[name] = row
    return out


def markdown(data: dict, env: dict) -> str:
    a = data["args"]
    lines = ["# peftkit speed levers, one at a time (MiniLM, SST-2)", "",
             f"peftkit {a['strategy']} on a fixed {a['n_train']}-sentence subset of SST-2 train, batch {a['batch']}, max "
             f"length {a['max_length']}, one epoch ({data['steps']} steps), precision auto → **{data['precision']}**; "
             f"{a['reps']} repetitions, variants alternating, each run a fresh process. Ratios are variant / defaults "
             "per repetition, median [min – max]: training time < 1 and tokens/s > 1 mean the variant is faster.", "",
             "| variant | what changes | start-up s | training s | vs defaults | steady tokens/s | vs defaults |",
             "|---|---|---|---|---|---|---|"]
    f = common.fmt
    for name, r in data["summary"].items():
        e, t = r["epoch_s_vs_defaults"], r["tokens_per_s_vs_defaults"]
        lines.append(f"| {name} | {r['what']} | {f(r['startup_s']['median'])} | {f(r['epoch_s']['median'])} | "
                     f"{f(e['median'], 2)} [{f(e['min'], 2)} – {f(e['max'], 2)}] | {f(r['tokens_per_s']['median'], 0)} | "
                     f"{f(t['median'], 2)} [{f(t['min'], 2)} – {f(t['max'], 2)}] |")
    lines += common.environment_section(data, env)
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--model", default="builtin:minilm")
    p.add_argument("--data", type=Path, default=common.SST2)
    p.add_argument("--strategy", default="lora")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--compile-reps", type=int, default=1, help="repetitions of the compile variant (minutes each)")
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--warmup", type=int, default=5, help="steps excluded from steady tokens/s")
    p.add_argument("--out", type=Path, default=common.RESULTS)
    p.add_argument("--name", default="speed_ablation")
    p.add_argument("--smoke", action="store_true", help="tiny model and data, nothing written")
    args = p.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        import peftkit  # noqa: F401  as in a user's program: it sets its threading defaults

        patch(VARIANTS[spec["variant"]][2])
        common.quiet()
        common.emit(vs_hf_trainer.worker_peftkit(spec))
        return 0
    if args.smoke:
        model, data = common.tiny_setup()
        args.model, args.data, args.n_train, args.reps, args.warmup, args.max_length, args.batch = \
            str(model), data, 48, 1, 1, 32, 8
        args.variants = [v for v in args.variants if v != "compile"]
    common.run_and_publish(args, run, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
