"""Command line: a thin layer over the library. User mistakes: one line on stderr, exit 2."""

from __future__ import annotations

import argparse
import errno


import json
import logging
import os
import sys
import warnings
from pathlib import Path

from peftkit.errors import UserError


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
    from peftkit import recipe as R

    from peftkit.runs import compare

    failed = 0
    for f in args.recipes:
        try:
            data = R.read_yaml(f)
            if "variants" in data:  # a compare recipe: every variant × seed is validated
                plan = compare.prepare(f, "/nonexistent", args.set)
                if plan.search is not None:  # every grid point's recipe too
                    from peftkit.runs.search import trial_plan

                    trial_plan(plan)
                print(f"ok   {f}  (compare: {len(plan.runs)} runs)")
                continue
            if "distributed_type" in data or "compute_environment" in data:
                print(f"skip {f}  (an accelerate config, not a recipe)")
                continue
            r = R.load(f, args.set)
            if args.data:  # the data files exist and parse (and have the task's columns)
                from peftkit import tasks

                tasks.get(r.task, tokenizer=None).raw_splits()
        except UserError as e:
            print(f"FAIL {e}", file=sys.stderr)
            failed += 1
            continue
        print(f"ok   {f}  ({r.task.kind} · {r.strategy.name} · {r.model.name})")
        if args.print_config:
            print(R.dump_yaml(r))
    return 2 if failed else 0


def cmd_train(args) -> int:
    from peftkit import recipe as R

    from peftkit.step import distributed as dist

    r = R.load(args.recipe, args.overrides)
    if (args.print_config or args.dry_run) and dist.env_rank() == 0:
        print(R.dump_yaml(r), end="")
    if args.dry_run:
        return 0
    out = Path(args.out or r.run_dir())
    from peftkit.training.rundir import check_run_dir

    # Resuming is automatic: a run dir with checkpoints of this recipe continues where it stopped.
    # Rank 0 decides (other ranks would find its files); the trainer shares its choice.
    mode = "resume"
    if dist.env_rank() == 0:
        from peftkit.training import lock as run_lock

        with run_lock.held(out):  # no deciding (--force clears files) while another process writes it
            mode = check_run_dir(out, r.hash(), args.force, resume=not args.no_resume)
    if args.launcher != "none" and not dist.launched():
        return _relaunch(args, out)
    if dist.env_rank() != 0:
        dist.quiet_rank()
    from peftkit import api

    res = api.fit(r, out, resume=mode == "resume")
    if dist.env_rank() != 0:
        return 0
    m = res["metrics"]["eval"]
    shown = ", ".join(f"{k} {v:.4f}" for k, v in m.items() if isinstance(v, float) and not k.startswith("eval_"))
    sps = res["speed"]["train_samples_per_s"]
    speed = f"{sps:.1f} samples/s; " if sps else ""
    print(f"[peftkit] done: {shown} on {res['metrics']['eval_split']} ({m['examples']} examples); "
          f"{speed}result: {out / 'result.json'}")
    return 0


def cmd_export(args) -> int:
    from peftkit import api

    out = Path(args.out)
    s = api.export(args.run_dir, out, dtype=args.dtype, verify=args.verify, adapter_only=args.adapter_only,
                   verify_examples=args.verify_examples, force=args.force, push_to_hub=args.push_to_hub)
    what = f"merged, {s['dtype']}" if s["merged"] else f"adapter only, {s['format']} format"
    print(f"[peftkit] exported {s['strategy']} ({what}) to {out}: {len(s['files'])} files, {s['bytes'] / 1e6:.2f} MB")
    v = s.get("verify")
    if v is None:
        return 0
    m = ", ".join(f"{k} {v['metrics']['trained'][k]:.4f} -> {v['metrics']['exported'][k]:.4f}"
                  for k, x in v["metrics"]["trained"].items() if isinstance(x, float))
    print(f"[peftkit] verify {'ok' if v['passed'] else 'FAILED'}: {v['examples']} examples, "
          f"max |dlogit| {v['max_abs_logit_diff']:.2e} (tolerance {v['tolerance']['max_abs_logit_diff']:.0e}), "
          f"argmax agreement {100 * v['argmax_agreement']:.1f}%, {m}; {out / 'verify.json'}")
    if (mc := v.get("metric_check") or {}).get("passed") is False:
        print(f"[peftkit] verify FAILED: {mc['metric']} of the export {mc['exported']} on {mc['examples']} examples, "
              f"the run recorded {mc['recorded']} (tolerance {mc['tolerance']:.3g}: {mc['rule']})")
    return 0 if v["passed"] else 1


def cmd_predict(args) -> int:
    import json

    from peftkit.export.predict import Predictor

    texts = [line.rstrip("\n") for line in sys.stdin if line.strip()] if args.texts == ["-"] else args.texts
    inputs = texts
    if args.json_input:
        try:
            inputs = [json.loads(t) for t in texts]
        except ValueError as e:
            raise UserError(f"--json-input: not JSON ({e})") from None
    pred = Predictor.load(args.path)
    preds = pred.predict(inputs, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    key = pred.task.echo_key  # classification echoes the input as "text"; generated tasks return their own
    rows = [{key: x, **p} for x, p in zip(inputs, preds)]
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
    else:
        for t, p, row in zip(texts, preds, rows):
            print(f"{p['label']}\t{p['score']:.4f}\t{t}" if "label" in p else json.dumps(row, ensure_ascii=False))
    return 0


def _relaunch(args, out: Path) -> int:
    """Run this train command in ``--nproc`` processes under torchrun / accelerate launch."""
    import subprocess

    from peftkit.step import distributed as dist

    argv = ["train", args.recipe, *args.overrides, "--out", str(out)]
    argv += ["--force"] if args.force else []
    argv += ["--no-resume"] if args.no_resume else []
    cmd = dist.launch_command(argv, args.launcher, args.nproc, args.accelerate_config)
    print(f"[peftkit] launching: {dist.format_command(cmd)}", file=sys.stderr)
    return subprocess.call(cmd)


def cmd_estimate(args) -> int:
    from peftkit import recipe as R
    from peftkit.estimate.fit import parse_bytes
    from peftkit.runs import fit_table
    from peftkit import api
    from peftkit.estimate.trace import render

    recipe, overrides = args.recipe, list(args.overrides)
    if recipe is None or ("=" in recipe and not Path(recipe).exists()):  # only overrides: the default recipe
        overrides = ([recipe] if recipe else []) + overrides
        recipe = str(Path(__file__).parent / "estimate" / "catalog" / "default.yaml")
    if args.fit or fit_table.is_compare(recipe):
        budget = parse_bytes(args.fit) if args.fit else None
        rows = fit_table.table(recipe, overrides, budget, args.device, args.batch_size, args.seq_len)
        print(json.dumps(rows, indent=2)) if args.json else fit_table.render(rows, budget, args.device)
        return 0
    r = R.load(recipe, overrides)
    est = api.estimate(r, batch_size=args.batch_size, seq_len=args.seq_len, device=args.device)
    if args.json:
        print(json.dumps(est, indent=2))
    else:
        render(est, r)
    return 0


def cmd_compare(args) -> int:
    from peftkit import api
    from peftkit.runs import executors

    flags = {k: getattr(args, k) for k in executors.cli_flags()}
    report = api.compare(args.recipe, args.out, args.overrides, timeout=args.timeout,
                         executor={"name": args.executor, **flags})
    return 1 if report["failed"] else 0


def cmd_report(args) -> int:
    from peftkit import api

    api.report(args.dir, screenshot=args.screenshot)
    return 0


def _executor_flags(c) -> None:
    """Where compare's runs execute; each flag overrides the compare recipe's ``executor:`` section."""
    from peftkit.runs import executors  # the registry: its names and each executor's options

    g = c.add_argument_group("executor (default: the recipe's executor: section, else local, one at a time)")
    said = [f"{n}: {(e.__doc__ or '').strip().splitlines()[0].rstrip('.')}" for n, e in executors.REGISTRY.items()]
    g.add_argument("--executor", choices=list(executors.REGISTRY), help="where the runs execute: " + "; ".join(said))
    for field, kw in executors.cli_flags().items():
        g.add_argument("--" + field.replace("_", "-"), dest=field, **kw)


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

    e = sub.add_parser("estimate", help="predict a training step's peak memory, before loading any weight")
    e.add_argument("recipe", nargs="?", help="recipe or compare recipe (default: peftkit/estimate/catalog/default.yaml)")
    e.add_argument("overrides", nargs="*", help="dotted overrides, e.g. strategy.name=qlora")
    e.add_argument("--batch-size", type=int, help="default: train.batch_size")
    e.add_argument("--seq-len", type=int, help="default: task.max_length (every batch padded to it: an upper bound)")
    e.add_argument("--json", action="store_true", help="print the estimate as JSON")
    e.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="target device to model (no GPU needed)")
    e.add_argument("--fit", metavar="SIZE", help="e.g. 24GiB: per strategy, fits / tight / does not fit (reserved "
                   "peak + 5%% margin), largest batch / longest sequence that fit, the cheapest change when not")
    e.set_defaults(fn=cmd_estimate)

    c = sub.add_parser("compare", help="run every variant of a compare recipe in its own process, then report")
    c.add_argument("recipe")
    c.add_argument("overrides", nargs="*", help="dotted overrides applied to every variant")
    c.add_argument("--out", required=True, help="directory: <out>/<variant>/seed<k>/ and the report")
    c.add_argument("--timeout", type=float, help="seconds per run (default: none)")
    _executor_flags(c)
    c.set_defaults(fn=cmd_compare)

    rp = sub.add_parser("report", help="table + plots from a directory of comparison runs")
    rp.add_argument("dir")
    rp.add_argument("--screenshot", metavar="PNG", help="also save a headless-chromium screenshot of report.html")
    rp.set_defaults(fn=cmd_report)

    v = sub.add_parser("validate", help="check recipes without loading weights")
    v.add_argument("recipes", nargs="+", help="recipe files, then dotted overrides (KEY=VALUE) for every one")
    v.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override (repeatable)")
    v.add_argument("--print-config", action="store_true", help="print each resolved recipe")
    v.add_argument("--data", action="store_true", help="also read each recipe's data files (exist, parse, columns)")
    v.set_defaults(fn=cmd_validate)

    e = sub.add_parser("export", help="merge a run into a plain transformers model directory")
    e.add_argument("run_dir")
    e.add_argument("--out", required=True, help="directory to write (replaced atomically)")
    e.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="dtype of merged weights")
    e.add_argument("--verify", action="store_true", help="reload the export and compare it with the trained model")
    e.add_argument("--verify-examples", type=int, default=64, metavar="N", help="eval examples for --verify")
    e.add_argument("--adapter-only", action="store_true", help="write only the strategy's weights (+ recipe, tokenizer)")
    e.add_argument("--force", action="store_true", help="replace a non-empty --out")
    e.add_argument("--push-to-hub", metavar="REPO", help="then upload the export to this (private) Hub model repo")
    e.set_defaults(fn=cmd_export)

    pr = sub.add_parser("predict", help="predict with an exported model or a run directory")
    pr.add_argument("path", help="exported model directory or run directory")
    pr.add_argument("texts", nargs="+", help="inputs ('-' reads one per line from stdin); output one line each "
                    "(classification: label, score, text; other tasks: a JSON object)")
    pr.add_argument("--json", action="store_true", help="print one JSON array")
    pr.add_argument("--json-input", action="store_true",
                    help="each input is JSON: a list of words (token_classification) or an object of the "
                         "prompt template's columns (causal_lm, seq2seq)")
    pr.add_argument("--batch-size", type=int, default=32)
    pr.add_argument("--max-new-tokens", type=int, help="generation tasks: at most this many new tokens "
                    "(default: the task's)")
    pr.set_defaults(fn=cmd_predict)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Like parse_args, but KEY=VALUE overrides may come anywhere (also after --out)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.cmd == "validate":  # validate R1 R2 k=v: an argument with '=' is an override, not a file
        args.set += [a for a in args.recipes if "=" in a]
        args.recipes = [a for a in args.recipes if "=" not in a]
        if not args.recipes:
            parser.error("validate: no recipe file given")
    where = "set" if args.cmd == "validate" else "overrides"
    unknown = [a for a in extra if a.startswith("-") or not hasattr(args, where)]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:  # the recipe's parser names a malformed one (e.g. no '=') in one line
        setattr(args, where, getattr(args, where) + extra)
    return args


def main(argv: list[str] | None = None) -> int:
    _quiet()
    args = parse_args(argv)
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
