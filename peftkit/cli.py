"""Command line: a thin layer over the library. User mistakes: one line on stderr, exit 2."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import warnings
from pathlib import Path

from .errors import UserError


def _quiet():
    # Library chatter (deprecations, optional-kernel notices) is not for the user's terminal.
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in ("bitsandbytes", "transformers", "accelerate", "datasets", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # datasets logs parse failures as ERROR before raising; peftkit reports them as one line.
    logging.getLogger("datasets").setLevel(logging.CRITICAL)


def cmd_validate(args) -> int:
    from . import recipe as R

    failed = 0
    for f in args.recipes:
        try:
            r = R.load(f, args.set)
        except UserError as e:
            print(f"FAIL {e}", file=sys.stderr)
            failed += 1
            continue
        print(f"ok   {f}  ({r.task.kind} · {r.strategy.name} · {r.model.name})")
        if args.print_config:
            print(R.dump_yaml(r))
    return 2 if failed else 0


def cmd_train(args) -> int:
    from . import recipe as R

    from . import distributed as dist

    r = R.load(args.recipe, args.overrides)
    if (args.print_config or args.dry_run) and dist.env_rank() == 0:
        print(R.dump_yaml(r), end="")
    if args.dry_run:
        return 0
    out = Path(args.out or r.run_dir())
    from .checkpoint import check_run_dir

    # Resuming is automatic: a run dir with checkpoints of this recipe continues where it stopped.
    # Rank 0 decides (other ranks would find its files); the trainer shares its choice.
    mode = "resume"
    if dist.env_rank() == 0:
        mode = check_run_dir(out, r.hash(), args.force, resume=not args.no_resume)
    if args.launcher != "none" and not dist.launched():
        return _relaunch(args, out)
    if dist.env_rank() != 0:
        dist.quiet_rank()
    from .build import build
    from .trainer import Trainer

    res = Trainer(build(r), out, resume=mode == "resume").fit()
    if dist.env_rank() != 0:
        return 0
    m = res["metrics"]["eval"]
    shown = ", ".join(f"{k} {v:.4f}" for k, v in m.items() if isinstance(v, float) and not k.startswith("eval_"))
    sps = res["speed"]["train_samples_per_s"]
    speed = f"{sps:.1f} samples/s; " if sps else ""
    print(f"[peftkit] done: {shown} on {res['metrics']['eval_split']} ({m['examples']} examples); "
          f"{speed}result: {out / 'result.json'}")
    return 0


def _relaunch(args, out: Path) -> int:
    """Run this train command in ``--nproc`` processes under torchrun / accelerate launch."""
    import subprocess

    from . import distributed as dist

    argv = ["train", args.recipe, *args.overrides, "--out", str(out)]
    argv += ["--force"] if args.force else []
    argv += ["--no-resume"] if args.no_resume else []
    cmd = dist.launch_command(argv, args.launcher, args.nproc, args.accelerate_config)
    print(f"[peftkit] launching: {dist.format_command(cmd)}", file=sys.stderr)
    return subprocess.call(cmd)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="peftkit", description="Parameter-efficient fine-tuning, measured side by side.")
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="train one recipe into a run directory")
    t.add_argument("recipe")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4 strategy.r=16")
    t.add_argument("--out", help="run directory (default: output.dir of the recipe)")
    t.add_argument("--force", action="store_true",
                   help="use a non-empty run directory: a finished run or another recipe's files there "
                        "are discarded (checkpoints of this recipe are still resumed)")
    t.add_argument("--no-resume", action="store_true",
                   help="start from scratch even if the run directory has checkpoints of this recipe")
    t.add_argument("--print-config", action="store_true", help="print the resolved recipe first")
    t.add_argument("--dry-run", action="store_true", help="print the resolved recipe and stop")
    t.add_argument("--launcher", choices=["none", "torchrun", "accelerate"], default="none",
                   help="start --nproc training processes (DDP; FSDP/DeepSpeed via --accelerate-config)")
    t.add_argument("--nproc", type=int, default=1, help="processes for --launcher (train.batch_size stays global)")
    t.add_argument("--accelerate-config", help="accelerate config file for --launcher accelerate "
                                               "(see recipes/accelerate/)")
    t.set_defaults(fn=cmd_train)

    v = sub.add_parser("validate", help="check recipes without loading weights")
    v.add_argument("recipes", nargs="+")
    v.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override (repeatable)")
    v.add_argument("--print-config", action="store_true", help="print each resolved recipe")
    v.set_defaults(fn=cmd_validate)
    return p


def main(argv: list[str] | None = None) -> int:
    _quiet()
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except UserError as e:
        print(f"peftkit: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("peftkit: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        # The machine, not peftkit: disk full, read-only file system, quota.
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EACCES, errno.EPERM):
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"peftkit: error: {where}cannot write ({e.strerror})", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
