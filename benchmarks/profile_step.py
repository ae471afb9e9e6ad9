"""Where a training step's CPU time goes: torch.profiler over steps of the real trainer.

Explains the MFU gap (``mfu.py``): operator self-time per step, grouped into matmuls,
optimizer, dtype casts, dropout, zero-fills, gradient norms and the rest.

    python benchmarks/profile_step.py                        # full, MiniLM, SST-2, batch 32
    python benchmarks/profile_step.py --strategy lora --batch 256
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

GROUPS = {  # aten op -> what it is in a training step
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"),
    "optimizer": ("aten::_fused_adamw_", "aten::_foreach_", "Optimizer."),
    "dtype casts (autocast)": ("aten::copy_", "aten::_to_copy", "aten::to"),
    "dropout masks": ("aten::bernoulli_", "aten::native_dropout"),
    "zero-fills (e.g. dense embedding gradient)": ("aten::fill_", "aten::zero_", "aten::zeros"),
    "gradient norms (clipping)": ("aten::linalg_vector_norm", "aten::norm"),
    "python / framework (outside ops)": ("ProfilerStep",),
}


def group_of(key: str) -> str:
    return next((g for g, prefixes in GROUPS.items() if key.startswith(prefixes)), "other ops")


def run(args) -> dict:
    from torch.profiler import ProfilerActivity, profile, schedule

    from peftkit import recipe as R
    from peftkit.model.build import build
    from peftkit.training.trainer import Trainer

    rec = R.from_dict({
        "name": "profile", "model": {"name": args.model, "frozen_dtype": args.frozen_dtype},
        "task": {"kind": "classification", "max_length": args.max_length, "text_column": "sentence",
                 "label_column": "label", "data": common.sst2_data_section(args.n_train, 32, args.data)},
        "strategy": {"name": args.strategy},
        "train": {"seed": 0, "max_steps": args.wait + 2 + args.steps, "batch_size": args.batch, "lr": 1e-4,
                  "precision": args.precision, "progress": False},
        "output": {"save_weights": False}})
    built = build(rec)
    prof = profile(activities=[ProfilerActivity.CPU], schedule=schedule(wait=args.wait, warmup=2, active=args.steps))
    trainer = None

    def step(run, batches, n):  # the schedule advances per trainer step: a global optimizer hook would
        Trainer._step(trainer, run, batches, n)  # also count the memory estimate's fake optimizer steps
        prof.step()

    with tempfile.TemporaryDirectory() as d:
        trainer = Trainer(built, d)
        trainer._step = step
        prof.start()
        trainer.fit()
        prof.stop()
    ops = [{"op": e.key, "self_ms_per_step": e.self_cpu_time_total / args.steps / 1e3, "calls_per_step": e.count / args.steps}
           for e in prof.key_averages()]
    total = sum(o["self_ms_per_step"] for o in ops)
    groups: dict = {}
    for o in ops:
        groups[group_of(o["op"])] = groups.get(group_of(o["op"]), 0.0) + o["self_ms_per_step"]
    return {"schema": "peftkit.bench.profile/1", "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "total_self_ms_per_step": total, "groups_ms_per_step": dict(sorted(groups.items(), key=lambda kv: -kv[1])),
            "top_ops": sorted(ops, key=lambda o: -o["self_ms_per_step"])[:20]}


def markdown(data: dict, env: dict) -> str:
    a, tot = data["args"], data["total_self_ms_per_step"]
    lines = ["# Where a training step's time goes (MiniLM, SST-2)", "",
             f"`torch.profiler` (CPU) over {a['steps']} steps of the peftkit trainer after {a['wait'] + 2} untimed ones: "
             f"strategy {a['strategy']}, batch {a['batch']}, max length {a['max_length']}, {a['precision']}, frozen weights {a.get('frozen_dtype', 'auto')}. Operator "
             f"self time, {tot:.1f} ms per step in all (summed over threads' ops, so not wall time).", "",
             "| part | ms / step | share |", "|---|---|---|"]
    lines += [f"| {g} | {ms:.1f} | {100 * ms / tot:.1f}% |" for g, ms in data["groups_ms_per_step"].items()]
    lines += ["", "| top operators | ms / step | calls / step |", "|---|---|---|"]
    lines += [f"| `{o['op'][:60]}` | {o['self_ms_per_step']:.2f} | {o['calls_per_step']:.0f} |" for o in data["top_ops"][:12]]
    lines += ["", "## Environment", "", *common.env_lines(env), ""]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="builtin:minilm")
    p.add_argument("--data", type=Path, default=common.SST2)
    p.add_argument("--strategy", default="full")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--frozen-dtype", default="auto", choices=["auto", "keep"], help="model.frozen_dtype")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--n-train", type=int, default=2048)
    p.add_argument("--wait", type=int, default=4, help="untimed steps before profiling")
    p.add_argument("--steps", type=int, default=8, help="profiled steps")
    p.add_argument("--out", type=Path, default=common.RESULTS)
    p.add_argument("--name", default="profile_step")
    args = p.parse_args(argv)
    import peftkit  # noqa: F401  threading defaults, as in a user's program

    common.quiet()
    env = common.environment()
    data = run(args)
    common.publish(args.name, data, markdown(data, env), args.out)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
