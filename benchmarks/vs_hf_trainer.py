"""peftkit vs Hugging Face ``transformers.Trainer`` + ``peft``: throughput, memory, accuracy.

Same model (builtin MiniLM), same SST-2 subset, same strategy, batch size, max length, lr,
schedule and step count. Two settings:

* ``identical``: both tools with the same precision (``--precision``, bf16 autocast by
  default), dynamic padding, length-grouped batches and fused AdamW.
* ``defaults``: each tool's recommended defaults. HF: ``run_glue.py`` style (pad to
  max_length, fp32, random batches, its default optimizer); peftkit: its recipe defaults
  (bf16 autocast, dynamic padding, length-grouped batches, its default optimizer (fused AdamW), OpenMP passive wait policy).

Accuracy on SST-2 test.tsv after ``--acc-steps`` steps (``--acc-seeds`` seeds, tools alternating)
is measured in each of ``--settings``; LoRA once per ``--poolers`` mode (see POOLERS). The
issue-18 case, identical settings::

    python benchmarks/vs_hf_trainer.py --settings identical --precision fp32 --reps 0 --n-train 2000 \
        --acc-steps 63 --max-length 64 --strategies lora full --poolers train lora --name vs_hf_trainer_accuracy_identical

Every run is a fresh subprocess; tools alternate within each repetition. Throughput is
timed identically for both (``common.StepClock``: optimizer-step timestamps, real tokens
from the attention mask); memory is the peak RSS above the RSS just before training starts
(``peftkit.step.measure.PeakRSS``, same sampler for both).

    python benchmarks/vs_hf_trainer.py                  # full run, writes benchmarks/results/
    python benchmarks/vs_hf_trainer.py --smoke          # seconds, tiny model, nothing written
"""

from __future__ import annotations

import time

T_PROCESS = time.perf_counter()  # a worker's start, before any import: start-up is part of what a user waits for

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

LORA = dict(r=8, alpha=16.0, targets=["query", "key", "value", "output.dense", "intermediate.dense"])
# What LoRA does with the classification pooler (BERT's CLS -> dense -> tanh, all-MiniLM-L6-v2 never
# trained it: it was trained with mean pooling). "train": trainable in full (peftkit's default,
# task.train_pooler; HF: modules_to_save=[classifier, pooler]); "lora": LoRA on pooler.dense too (HF's
# usual target_modules=[query, key, value, dense]); "frozen": neither (peftkit task.train_pooler=false).
POOLERS = ("train", "lora", "frozen")


# -- workers (one training run each, in a fresh process) ---------------------------------------
def _policy(spec: dict, tool: str) -> dict:
    """precision / padding / batch order / optimizer of this tool in this setting."""
    if spec["setting"] == "identical":
        return {"precision": spec["precision"], "pad_to_max": False, "group_by_length": True,
                "optimizer": "adamw_fused"}
    if tool == "hf":  # run_glue.py defaults on a CPU: pad_to_max_length, fp32, RandomSampler
        return {"precision": "fp32", "pad_to_max": True, "group_by_length": False, "optimizer": "hf_default"}
    return {"precision": "auto", "pad_to_max": False, "group_by_length": True, "optimizer": None}


def worker_peftkit(spec: dict) -> dict:
    from peftkit.step import measure
    from peftkit import recipe as R
    from peftkit.model.build import build
    from peftkit.training.trainer import Trainer

    pol = _policy(spec, "peftkit")
    strategy = {"name": spec["strategy"]}
    pooler = spec.get("pooler", "train")
    if spec["strategy"] == "lora":
        targets = LORA["targets"] + (["pooler.dense"] if pooler == "lora" else [])
        strategy.update(r=LORA["r"], alpha=LORA["alpha"], target_modules=targets)
    rec = R.from_dict({
        "name": "bench",
        "model": {"name": spec["model"], **spec.get("model_extra", {})},
        "task": {"kind": "classification", "max_length": spec["max_length"], "text_column": "sentence",
                 "label_column": "label", "train_pooler": pooler == "train" or spec["strategy"] == "full",
                 "data": common.sst2_data_section(spec["n_train"], None if spec["eval"] else 32, Path(spec["data"]))},
        "strategy": strategy,
        "train": {"seed": spec["seed"], "max_steps": spec["steps"], "batch_size": spec["batch"], "lr": spec["lr"],
                  "warmup_ratio": spec["warmup_ratio"], "weight_decay": 0.0, "max_grad_norm": 1.0,
                  "precision": pol["precision"], **({"optimizer": pol["optimizer"]} if pol["optimizer"] else {}),
                  "group_by_length": pol["group_by_length"], "progress": False, "log_every": 10,
                  **spec.get("train_extra", {})},
        "output": {"save_weights": False},
    })
    built = build(rec)
    import rich.progress  # noqa: F401  imported lazily by fit(): outside the measured window, as HF's are
    import sklearn.metrics  # noqa: F401

    data = built.task.datasets()  # tokenized once, before the measured window (as for HF)
    built.task.datasets = lambda: data
    with tempfile.TemporaryDirectory() as d:
        trainer = Trainer(built, d)
        clock = common.StepClock(built.model)
        with measure.PeakRSS() as rss:
            t_call = time.perf_counter()
            res = trainer.fit()
            call_s = time.perf_counter() - t_call
        clock.close()
    # The training phase a user waits for: the whole fit() call, every step and all the loop does
    # (estimate, probes, logging) counted; only its final evaluation is left out (HF's train() has none).
    phases = {**clock.phases(T_PROCESS), "train_call_s": call_s - (res["metrics"]["eval"].get("eval_s") or 0.0)}
    out = {"speed": clock.summary(spec["warmup"]), "phases": phases,
           "peak_rss_delta_bytes": rss.peak - rss.baseline, "rss_baseline_bytes": rss.baseline, "process_peak_rss_bytes": common.peak_rss_bytes(),
           "policy": pol, "trainer_speed": res["speed"], "trainer_memory": res["memory"]["measured"], "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
           "optimizer": rec.train.optimizer, "trainable_params": res["params"]["trainable"]}
    if spec["eval"]:
        out["accuracy"] = res["metrics"]["eval"]["accuracy"]
        out["eval_examples"] = res["metrics"]["eval"]["examples"]
    return out


def worker_hf(spec: dict) -> dict:
    import numpy as np
    import torch
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments, default_data_collator, set_seed)

    from peftkit.step import measure
    from peftkit.model.backbone import resolve

    pol = _policy(spec, "hf")
    path = resolve(spec["model"])
    set_seed(spec["seed"])
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, attn_implementation="sdpa")
    if spec["strategy"] == "lora":
        import peft

        pooler = spec.get("pooler", "train")
        model = peft.get_peft_model(model, peft.LoraConfig(
            r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
            target_modules=LORA["targets"] + (["pooler.dense"] if pooler == "lora" else []),
            modules_to_save=["classifier"] + (["pooler"] if pooler == "train" else []), task_type="SEQ_CLS"))
    splits = common.sst2_hf_splits(spec["n_train"], None, Path(spec["data"]))
    pad = "max_length" if pol["pad_to_max"] else False

    def enc(b):
        out = tok(b["sentence"], truncation=True, max_length=spec["max_length"], padding=pad)
        out["length"] = [len(x) for x in out["input_ids"]]
        return out

    train = splits["train"].map(enc, batched=True, remove_columns=["sentence"])
    test = splits["test"].map(enc, batched=True, remove_columns=["sentence"])
    kw = {} if pol["optimizer"] == "hf_default" else {"optim": "adamw_torch_fused"}
    with tempfile.TemporaryDirectory() as d:
        args = TrainingArguments(
            output_dir=d, per_device_train_batch_size=spec["batch"], per_device_eval_batch_size=2 * spec["batch"],
            # peftkit's warm-up: int(ratio x steps) (HF reads a float < 1 as a ratio but rounds up)
            learning_rate=spec["lr"], max_steps=spec["steps"], warmup_steps=int(spec["warmup_ratio"] * spec["steps"]),
            lr_scheduler_type="linear", weight_decay=0.0, max_grad_norm=1.0, bf16=pol["precision"] == "bf16",
            use_cpu=not torch.cuda.is_available(), save_strategy="no", report_to="none", logging_steps=10,
            disable_tqdm=True, seed=spec["seed"], dataloader_num_workers=0,
            train_sampling_strategy="group_by_length" if pol["group_by_length"] else "random", **kw)
        collator = default_data_collator if pol["pad_to_max"] else DataCollatorWithPadding(tok)
        trainer = Trainer(model=model, args=args, train_dataset=train.remove_columns([]), data_collator=collator,
                          processing_class=tok)
        clock = common.StepClock(model)
        with measure.PeakRSS() as rss:
            t_call = time.perf_counter()
            trainer.train()
            call_s = time.perf_counter() - t_call
        clock.close()
        out = {"speed": clock.summary(spec["warmup"]), "phases": {**clock.phases(T_PROCESS), "train_call_s": call_s},
               "peak_rss_delta_bytes": rss.peak - rss.baseline, "rss_baseline_bytes": rss.baseline,
               "process_peak_rss_bytes": common.peak_rss_bytes(), "policy": pol,
               "hf_optim": str(args.optim), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
               "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
        if spec["eval"]:
            pred = trainer.predict(test.remove_columns(["length"]))
            # label_ids, not test["label"]: with train_sampling_strategy="group_by_length" transformers 5
            # predicts through a length-grouped (shuffled) sampler too (Trainer._get_eval_sampler), so
            # the predictions come back in another order than the dataset's (~50% accuracy against it).
            out["accuracy"] = float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())
            out["eval_examples"] = len(test)
    return out


# -- the parent: alternate, repeat, aggregate ----------------------------------------------------
def _env(spec: dict) -> dict:
    """Both tools, both settings: OMP_WAIT_POLICY=PASSIVE (peftkit's import default). HF as
    shipped spins its OpenMP threads, which on a loaded CPU is several times slower; giving
    HF the passive policy too keeps that effect out of the ratios (it is measured apart)."""
    return {"OMP_WAIT_POLICY": "PASSIVE"}


def run(args) -> dict:
    script = Path(__file__).resolve()
    from peftkit import hardware

    precision = hardware.resolve(args.precision).resolved  # one value for both tools (auto: what this CPU runs fast)
    steps = -(-args.n_train // args.batch) if args.epoch else args.steps
    base = dict(model=args.model, data=str(args.data), n_train=args.n_train, batch=args.batch,
                max_length=args.max_length, warmup_ratio=0.06, seed=0, precision=precision)
    lrs = {"full": args.lr_full, "lora": args.lr_lora}
    runs = []
    for setting in args.settings:
        for strategy in args.strategies:
            for rep in range(args.reps):
                tools = ("peftkit", "hf") if rep % 2 == 0 else ("hf", "peftkit")  # alternate who goes first
                for tool in tools:
                    spec = {**base, "tool": tool, "setting": setting, "strategy": strategy, "lr": lrs[strategy],
                            "steps": steps, "warmup": args.warmup, "eval": False}
                    r = common.run_worker(script, spec, env=_env(spec))
                    runs.append({"spec": spec, "rep": rep, **r})
                    ph = r["phases"]
                    print(f"{setting:9s} {strategy:5s} rep {rep} {tool:7s}: {r['speed']['samples_per_s']:7.1f} samples/s "
                          f"{r['speed']['tokens_per_s']:8.0f} tok/s  peak +{r['peak_rss_delta_bytes'] / 2**20:6.0f} MiB "
                          f"start-up {ph['startup_s']:.1f} s, training {ph['epoch_s']:.1f} s "
                          f"(load {r['loadavg_after'][0]:.2f})", flush=True)
    acc = []
    n_acc = acc_sentences(args)
    if args.acc_steps:
        for setting in args.settings:
            for strategy in args.strategies:
                for pooler in (args.poolers if strategy == "lora" else ["train"]):
                    for seed in range(args.acc_seeds):
                        for tool in ("peftkit", "hf") if seed % 2 == 0 else ("hf", "peftkit"):
                            spec = {**base, "tool": tool, "setting": setting, "strategy": strategy, "lr": lrs[strategy],
                                    "steps": args.acc_steps, "warmup": args.warmup, "eval": True, "seed": seed,
                                    "n_train": n_acc, "pooler": pooler}
                            r = common.run_worker(script, spec, env=_env(spec))
                            acc.append({"spec": spec, **r})
                            print(f"accuracy  {setting:9s} {strategy:5s} pooler {pooler:6s} seed {seed} {tool:7s}: "
                                  f"{r['accuracy']:.4f} after {args.acc_steps} steps ({r['speed']['samples_per_s']:.1f} "
                                  f"samples/s, {r['trainable_params']:,} trainable; load {r['loadavg_after'][0]:.2f})",
                                  flush=True)
    return {"schema": "peftkit.bench.vs_hf/1", "args": {k: str(v) if isinstance(v, Path) else v
                                                          for k, v in vars(args).items()},
            "precision": precision, "steps": steps, "runs": runs, "accuracy_runs": acc, "summary": summarize(runs, acc)}


def acc_sentences(args) -> int:
    """n_train sentences if they fill acc_steps batches (2,000 of 32: 63 steps, one epoch), else more."""
    return args.n_train if -(-args.n_train // args.batch) >= args.acc_steps else args.acc_steps * args.batch


def summarize(runs: list[dict], acc: list[dict]) -> dict:
    """Per (setting, strategy): ratios peftkit/HF paired by repetition, median and spread."""
    out: dict = {}
    keys = sorted({(r["spec"]["setting"], r["spec"]["strategy"]) for r in runs})
    for setting, strategy in keys:
        by = {(r["rep"], r["spec"]["tool"]): r for r in runs
              if r["spec"]["setting"] == setting and r["spec"]["strategy"] == strategy}
        reps = sorted({rep for rep, _ in by})
        pairs = [(by[(k, "peftkit")], by[(k, "hf")]) for k in reps if (k, "peftkit") in by and (k, "hf") in by]
        row = {}
        for name, get in (("samples_per_s", lambda r: r["speed"]["samples_per_s"]),
                          ("tokens_per_s", lambda r: r["speed"]["tokens_per_s"]),
                          ("peak_rss_delta_bytes", lambda r: r["peak_rss_delta_bytes"]),
                          ("process_peak_rss_bytes", lambda r: r["process_peak_rss_bytes"])):
            row[name] = {"peftkit": common.spread([get(p) for p, _ in pairs]),
                         "hf": common.spread([get(h) for _, h in pairs]),
                         "ratio": common.spread([get(p) / get(h) if get(h) else None for p, h in pairs])}
        for name in ("train_call_s", "startup_s", "epoch_s", "to_trained_s"):  # HF / peftkit: > 1 = peftkit faster
            if not all(name in p["phases"] and name in h["phases"] for p, h in pairs):
                continue  # results written before train_call_s was measured
            row[name] = {"peftkit": common.spread([p["phases"][name] for p, _ in pairs]),
                         "hf": common.spread([h["phases"][name] for _, h in pairs]),
                         "speedup": common.spread([h["phases"][name] / p["phases"][name] for p, h in pairs])}
        row["padding_frac"] = {"peftkit": common.spread([p["speed"]["padding_frac"] for p, _ in pairs]),
                               "hf": common.spread([h["speed"]["padding_frac"] for _, h in pairs])}
        out[f"{setting}/{strategy}"] = row
    groups = dict.fromkeys((a["spec"]["setting"], a["spec"]["strategy"], a["spec"].get("pooler", "train")) for a in acc)
    for setting, strategy, pooler in groups:
        runs = [a for a in acc if (a["spec"]["setting"], a["spec"]["strategy"], a["spec"].get("pooler", "train"))
                == (setting, strategy, pooler)]
        entry = {"steps": runs[0]["spec"]["steps"], "n_train": runs[0]["spec"]["n_train"], "pooler": pooler}
        for tool in ("peftkit", "hf"):
            xs = [a["accuracy"] for a in runs if a["spec"]["tool"] == tool]
            entry[tool] = {"mean": statistics.mean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
                           "seeds": len(xs), "values": xs, "min": min(xs), "max": max(xs),
                           "trainable_params": next(a["trainable_params"] for a in runs if a["spec"]["tool"] == tool)}
        entry["within_hf_spread"] = entry["hf"]["min"] <= entry["peftkit"]["mean"] <= entry["hf"]["max"]
        if entry["peftkit"]["seeds"] > 1 and entry["hf"]["seeds"] > 1:
            from scipy import stats

            pk, hf = ([a["accuracy"] for a in runs if a["spec"]["tool"] == t] for t in ("peftkit", "hf"))
            p = float(stats.ttest_ind(pk, hf, equal_var=False).pvalue)
            entry["welch_p"] = p if p == p else None  # nan: no spread on either side
        key = f"{setting}/{strategy}" + (f"/pooler-{pooler}" if strategy == "lora" else "")
        out.setdefault(key, {})["accuracy"] = entry
    return out


TARGETS = {"identical": 1.5, "defaults": 2.0}
CPU_PHASE_TARGET = 1.2  # issue #25: the whole training phase >= 1.2x HF Trainer + peft at identical settings  # issue #16: >= 1.5x HF at identical settings
POOLER_TEXT = {"train": "trainable in full (peftkit's default; HF `modules_to_save=[classifier, pooler]`)",
               "lora": "LoRA on `pooler.dense` too (HF `target_modules=[query, key, value, dense]`)",
               "frozen": "frozen (peftkit `task.train_pooler=false`; HF `modules_to_save=[classifier]`)"}


def markdown(data: dict, env: dict) -> str:
    a = data["args"]
    lines = ["# peftkit vs HF Trainer + peft (MiniLM, SST-2)", ""]
    if not data["runs"]:  # accuracy runs only
        lines += [f"Builtin MiniLM (all-MiniLM-L6-v2) on a fixed {acc_sentences(argparse.Namespace(**a))}-sentence "
                  f"subset of SST-2 train ({a['acc_steps']} steps of {a['batch']}: one epoch), max length "
                  f"{a['max_length']}, each run in a fresh process."]
    else:
        lines += [
             f"Builtin MiniLM (all-MiniLM-L6-v2) on a fixed {a['n_train']}-sentence subset of SST-2 train, batch "
             f"{a['batch']}, max length {a['max_length']}, {data.get('steps', a['steps'])} steps per run "
             f"({'one epoch; ' if a.get('epoch') else ''}{a['warmup']} warm-up steps "
             f"excluded), {a['reps']} repetitions, tools alternating, each run in a fresh process. Ratios are "
             "peftkit / HF per repetition: median [min – max]. Memory: peak RSS above the RSS just before training "
             "(sampled every 5 ms, same sampler for both).", "",
             "| setting | strategy | samples/s peftkit | samples/s HF | ratio samples/s | ratio tokens/s | "
             "peak MiB peftkit | peak MiB HF | ratio peak mem | padding peftkit / HF | target |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, row in data["summary"].items():
        if "samples_per_s" not in row:
            continue
        setting, strategy = key.split("/")
        s, t, m = row["samples_per_s"], row["tokens_per_s"], row["peak_rss_delta_bytes"]
        r = s["ratio"]
        tgt = TARGETS[setting]
        met = "met" if r["median"] and r["median"] >= tgt and m["ratio"]["median"] <= 1.0 else "missed"
        lines.append(
            f"| {setting} | {strategy} | {common.fmt(s['peftkit']['median'])} | {common.fmt(s['hf']['median'])} | "
            f"{common.fmt(r['median'], 2)}× [{common.fmt(r['min'], 2)} – {common.fmt(r['max'], 2)}] | "
            f"{common.fmt(t['ratio']['median'], 2)}× | {common.fmt(m['peftkit']['median'] / 2**20, 0)} | "
            f"{common.fmt(m['hf']['median'] / 2**20, 0)} | {common.fmt(m['ratio']['median'], 2)} | "
            f"{100 * row['padding_frac']['peftkit']['median']:.0f}% / {100 * row['padding_frac']['hf']['median']:.0f}% | "
            f"≥{tgt}× samples/s, ≤1× mem: {met} |")
    called = {k: v for k, v in data["summary"].items() if "train_call_s" in v}
    if called:
        lines += ["", "**The training phase a user waits for** (issue #25's measure): wall time of the tool's train "
                  "call — peftkit `Trainer.fit()` without its final evaluation, HF `trainer.train()` — every step "
                  "and everything the loop does counted (set-up inside the call, estimate, probes, logging); "
                  "median over repetitions, speed-up = HF / peftkit paired by repetition.", "",
                  "| setting | strategy | training phase peftkit / HF | speed-up | target ≥1.2× |", "|---|---|---|---|---|"]
        for key, row in called.items():
            c = row["train_call_s"]
            met = "met" if c["speedup"]["median"] and c["speedup"]["median"] >= CPU_PHASE_TARGET else "missed"
            lines.append(f"| {key.split('/')[0]} | {key.split('/')[1]} | {common.fmt(c['peftkit']['median'])} s / "
                         f"{common.fmt(c['hf']['median'])} s | {common.fmt(c['speedup']['median'], 2)}× "
                         f"[{common.fmt(c['speedup']['min'], 2)} – {common.fmt(c['speedup']['max'], 2)}] | {met} |")
    timed = {k: v for k, v in data["summary"].items() if "epoch_s" in v}
    if timed:
        lines += ["", "Time a user waits, per run (median over repetitions; speed-up = HF / peftkit, paired by "
                  "repetition): start-up = worker's first line (before any import) to the first training forward; "
                  f"training = first forward to the last optimizer step ({data.get('steps', a['steps'])} steps, "
                  "first steps and everything the loop does included); to trained = both.", "",
                  "| setting | strategy | start-up peftkit / HF | speed-up | training peftkit / HF | speed-up | "
                  "to trained peftkit / HF | speed-up |", "|---|---|---|---|---|---|---|---|"]
        for key, row in timed.items():
            cells = [f"{common.fmt(row[n]['peftkit']['median'])} s / {common.fmt(row[n]['hf']['median'])} s | "
                     f"{common.fmt(row[n]['speedup']['median'], 2)}× [{common.fmt(row[n]['speedup']['min'], 2)} – "
                     f"{common.fmt(row[n]['speedup']['max'], 2)}]" for n in ("startup_s", "epoch_s", "to_trained_s")]
            lines.append(f"| {key.split('/')[0]} | {key.split('/')[1]} | " + " | ".join(cells) + " |")
    accs = {k: v["accuracy"] for k, v in data["summary"].items() if "accuracy" in v}
    if accs:
        lines += ["", f"Accuracy on SST-2 test.tsv (872 sentences) after one pass over the training sentences, same "
                  f"steps/lr/batch/seeds for both tools, tools alternating (mean ± std over seeds; [min – max]). "
                  f"Precision in the identical setting: {a.get('precision', 'bf16')}. Pooler: " + "; ".join(
                      f"{k} = {v}" for k, v in POOLER_TEXT.items()) + ".", "",
                  "| setting | strategy | pooler | sentences | steps | seeds | trainable peftkit / HF | peftkit | "
                  "HF Trainer + peft | difference | peftkit mean within HF's seed range | Welch p |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for key, v in accs.items():
            p, h = v["peftkit"], v["hf"]
            rng = lambda x: f"{100 * x['mean']:.2f} ± {100 * x['std']:.2f}% [{100 * x['min']:.1f} – {100 * x['max']:.1f}]"  # noqa: E731
            pval = f"{v['welch_p']:.2f}" if v.get("welch_p") is not None else "–"
            lines.append(f"| {key.split('/')[0]} | {key.split('/')[1]} | {v.get('pooler', 'train')} | {v.get('n_train')} | "
                         f"{v.get('steps')} | {p['seeds']} | {p['trainable_params']:,} / {h['trainable_params']:,} | "
                         f"{rng(p)} | {rng(h)} | {100 * (p['mean'] - h['mean']):+.2f} pt | "
                         f"{'yes' if v['within_hf_spread'] else 'no'} | {pval} |")
    prec = data.get("precision") or a.get("precision", "bf16")  # resolved for this machine
    lines += ["", f"Policies: identical = {prec}, dynamic padding, length-grouped batches, fused AdamW and "
              "OMP_WAIT_POLICY=PASSIVE for both; defaults = HF `run_glue.py` style (fp32, pad to max_length, random "
              "batches, `adamw_torch_fused`) vs peftkit recipe defaults (precision auto, "
              "dynamic padding, length-grouped batches, fused AdamW). Both tools run with OMP_WAIT_POLICY=PASSIVE in "
              "both settings (peftkit sets it on import; HF gets it from the environment, which favours HF on a "
              "loaded CPU).", *common.environment_section(data, env)]
    return "\n".join(lines)


def smoke_args(args):
    model, data = common.tiny_setup()
    args.model, args.data = str(model), data
    args.n_train, args.steps, args.warmup, args.reps, args.acc_steps, args.acc_seeds = 64, 4, 1, 1, 2, 2
    args.settings, args.strategies, args.poolers, args.precision = ["identical"], ["lora"], ["train", "lora"], "fp32"
    args.max_length, args.batch = 32, 8
    return args


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--model", default="builtin:minilm")
    p.add_argument("--data", type=Path, default=common.SST2)
    p.add_argument("--strategies", nargs="+", default=["full", "lora"])
    p.add_argument("--settings", nargs="+", default=["identical", "defaults"], choices=["identical", "defaults"])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--n-train", type=int, default=2048, help="fixed seeded subset of train.tsv used for timing")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--epoch", action="store_true", help="timing runs train one epoch of --n-train (not --steps)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="precision of the identical setting, both tools (auto: peftkit's choice for this machine)")
    p.add_argument("--warmup", type=int, default=5, help="steps excluded from timing")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lr-full", type=float, default=5e-5)
    p.add_argument("--lr-lora", type=float, default=5e-4)
    p.add_argument("--acc-steps", type=int, default=300, help="steps of the accuracy runs (0 = none)")
    p.add_argument("--acc-seeds", type=int, default=3, help="seeds of the accuracy runs, per tool and strategy")
    p.add_argument("--poolers", nargs="+", default=["train"], choices=POOLERS,
                   help="LoRA accuracy runs: what happens to the classification pooler (see POOLERS)")
    p.add_argument("--out", type=Path, default=common.RESULTS)
    p.add_argument("--name", default="vs_hf_trainer", help="results file name (without extension)")
    p.add_argument("--smoke", action="store_true", help="tiny model and data, a few steps, nothing written")
    args = p.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        if spec["tool"] == "peftkit":
            import peftkit  # noqa: F401  first, as in a user's program: it sets its threading defaults
        common.quiet()
        common.emit((worker_peftkit if spec["tool"] == "peftkit" else worker_hf)(spec))
        return 0
    if args.smoke:
        args = smoke_args(args)
    common.run_and_publish(args, run, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
