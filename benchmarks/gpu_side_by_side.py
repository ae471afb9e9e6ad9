"""peftkit vs HF ``Trainer`` + peft (vs TRL ``SFTTrainer``, unsloth: when importable) on one GPU,
at identical settings, on random-weight models of real shapes (issue #25).

Shapes come from ``peftkit/estimate/catalog/*.json`` (llama-3.2-1b, llama-3.1-8b): each is built
from its config with random weights on the GPU and saved once under ``--work`` (no download;
speed and memory depend on shapes, not weight values). The rows are causal-LM SFT examples of
~420 prompt + ~100 response tokens made of random vocabulary words, tokenized ONCE by peftkit's
causal-LM task: every tool trains on the same ids and labels, batch, length, optimizer (fused
AdamW), lr, bf16 autocast over bf16 weights, SDPA, LoRA r16 alpha 32 on the seven Llama
projections, no gradient checkpointing; QLoRA = nf4 + double quantization, bf16 compute, peft's
``prepare_model_for_kbit_training`` for HF (peftkit's default ``upcast_unquantized`` does the same).

Rows per (shape, strategy), tools alternating, each a fresh process:
``peftkit`` (identical settings), ``hf``, ``trl``/``unsloth`` (if importable) and
``peftkit-defaults``: what peftkit picks by itself on CUDA (attention auto -> FlashAttention when
installed, Liger kernels auto, padding-free batches when a varlen kernel runs).

Per row: steady tokens/s (after ``--warmup`` steps; every tool timed by the same optimizer-step
hook, ``common.StepClock``), p50/p90/max steady step, CUDA max allocated / reserved, and for
peftkit rows its memory estimate and the estimate's error. The issue's targets are printed as
pass/fail lines computed from the rows. ``--profile``: torch.profiler over 3 steady steps of
every row, top ops written beside the results (``<name>.profile/<row>.txt``).

    python benchmarks/gpu_side_by_side.py                  # one GPU, <= --budget-s (480 s) of runs
    python benchmarks/gpu_side_by_side.py --profile --shapes llama-3.1-8b --strategies qlora
    python benchmarks/gpu_side_by_side.py --dry-run        # CPU, tiny llama, seconds, in-process

Runs are started in priority order (8B qlora, 8B full, then the rest) while the time budget
lasts; a row that does not fit is recorded as skipped, never silently dropped.
"""

from __future__ import annotations

import time

T_PROCESS = time.perf_counter()

import argparse
import importlib.util
import json
import os
import random
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SCHEMA = "peftkit.gpu_side_by_side/1"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BATCH = {"llama-3.2-1b": 8, "llama-3.1-8b": 4, "tiny": 2}
# (shape, strategy) in the order they run while the budget lasts: the slowest gap first (8B qlora),
# then the MFU target (8B full).
PRIORITY = [("llama-3.1-8b", "qlora"), ("llama-3.1-8b", "full"), ("llama-3.2-1b", "lora"),
            ("llama-3.1-8b", "lora"), ("llama-3.2-1b", "full"), ("llama-3.2-1b", "qlora")]
TARGETS = {"lora": 1.3, "qlora": 1.3, "full": 1.1}  # peftkit tokens/s over HF's
MAX_STEP_OVER_MEDIAN = 1.5
MFU_TARGET = 0.45  # 8B full, of the measured bf16 matmul peak
EXTRA_PACKAGES = ("flash-attn", "flash-attn-4", "liger-kernel", "triton", "trl", "unsloth", "bitsandbytes")


def importable(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


# -- models and data (made once, before the runs) ------------------------------------------------
def tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=30522, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                       pad_token_id=0, bos_token_id=101, eos_token_id=102, tie_word_embeddings=True)


def make_model(shape: str, dest: Path, tokenizer: str) -> Path:
    """A random-weight model of ``shape`` saved as a from_pretrained directory with a tokenizer
    whose vocabulary fits; reused when already there."""
    if (dest / "config.json").exists():
        return dest
    import torch
    from transformers import AutoModelForCausalLM

    from peftkit.estimate.catalog import resolve_config
    from peftkit.model.backbone import load_tokenizer
    from peftkit.recipe import ModelConfig

    config = tiny_config() if shape == "tiny" else resolve_config(f"catalog:{shape}")
    tok = load_tokenizer(ModelConfig(name=tokenizer))
    if tok.eos_token is None or tok.eos_token == tok.sep_token:  # MiniLM's BERT vocabulary
        tok.eos_token, tok.bos_token = "[SEP]", "[CLS]"
    if len(tok) > config.vocab_size:
        raise SystemExit(f"--tokenizer {tokenizer}: {len(tok)} ids do not fit {shape}'s {config.vocab_size}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tmp = dest.with_name(dest.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(dest)
    del model
    if device == "cuda":  # the runs are other processes: give the GPU memory back
        torch.cuda.empty_cache()
    return dest


def make_rows(dest: Path, tokenizer_dir: Path, n_train: int, prompt_words: int, response_words: int) -> Path:
    """JSONL rows of random whole-word vocabulary entries (about one token each), lengths varying ±10%."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    words = sorted(w for w in tok.get_vocab() if w.isalpha() and w.isascii() and 3 <= len(w) <= 8)
    rng = random.Random(0)
    dest.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", 8)):
        with open(dest / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for _ in range(n):
                p = rng.randint(int(prompt_words * 0.9), int(prompt_words * 1.1))
                r = rng.randint(int(response_words * 0.9), int(response_words * 1.1))
                f.write(json.dumps({"prompt": " ".join(rng.choices(words, k=p)),
                                    "response": " ".join(rng.choices(words, k=r))}) + "\n")
    return dest


# -- the recipe every tool follows ------------------------------------------------------------------
def recipe(spec: dict, defaults: bool = False) -> dict:
    strategy = {"name": spec["strategy"]}
    if spec["strategy"] in ("lora", "qlora"):
        strategy.update(r=16, alpha=32.0, dropout=0.0, target_modules=LORA_TARGETS)
    model = {"name": spec["model"], "dtype": spec["dtype"]}
    train = {"max_steps": spec["steps"], "batch_size": spec["batch"], "lr": 1e-4, "warmup_ratio": 0.0,
             "precision": spec["precision"], "optimizer": "adamw_fused", "group_by_length": True,
             "progress": False, "log_every": 10, "checkpoint_every": None, "seed": 0}
    if not defaults:  # identical to HF: SDPA, stock kernels, padded batches
        model.update(attn_implementation="sdpa", kernels="none")
        train["padding_free"] = False
    return {
        "name": "side-by-side",
        "model": model,
        "task": {"kind": "causal_lm", "prompt": "{prompt}", "response_column": "response", "metric": "accuracy",
                 "max_length": spec["seq"], "max_target_length": spec["target"], "max_new_tokens": 1,
                 "data": {"dir": spec["data"], "train": "train.jsonl", "test": "test.jsonl"}},
        "strategy": strategy,
        "train": train,
        "output": {"save_weights": False, "report_to": []},
    }


def tokenized(spec: dict):
    """(tokenizer, train split as peftkit's causal-LM task encodes it): the same rows for every tool."""
    from peftkit import recipe as R, tasks
    from peftkit.model.backbone import load_tokenizer

    rec = R.from_dict(recipe(spec))
    tok = load_tokenizer(rec.model)
    return tok, tasks.get(rec.task, tok).datasets()["train"]


# -- measurement shared by every tool -----------------------------------------------------------------
class Meter:
    """The same clock (optimizer-step stamps), CUDA peaks and optional profiler for every tool."""

    def __init__(self, model, spec: dict):
        import torch

        self.spec, self.prof = spec, None
        if spec.get("profile"):
            from torch.profiler import ProfilerActivity, profile, schedule

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.prof = profile(activities=acts, schedule=schedule(wait=max(0, spec["warmup"] - 1), warmup=1, active=3,
                                                                  repeat=1), record_shapes=False)
            self.prof.__enter__()
        self.clock = common.StepClock(model, on_step=self.prof.step if self.prof else None)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def result(self) -> dict:
        import torch

        self.clock.close()
        s = self.clock.summary(self.spec["warmup"])
        st = self.clock.stamps[max(0, s["warmup_steps"] - 1):]
        steps = sorted(b - a for a, b in zip(st, st[1:]))
        out = {"speed": s, "step_p50_s": _q(steps, 0.5), "step_p90_s": _q(steps, 0.9),
               "step_max_s": steps[-1] if steps else None, "steady_steps": len(steps),
               "phases": self.clock.phases(T_PROCESS)}
        if torch.cuda.is_available():
            out.update(max_allocated_bytes=torch.cuda.max_memory_allocated(),
                       max_reserved_bytes=torch.cuda.max_memory_reserved())
        if self.prof is not None:
            self.prof.__exit__(None, None, None)
            key = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
            out["profile_top"] = self.prof.key_averages().table(sort_by=key, row_limit=30)
        return out


def _q(xs: list[float], q: float):
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None


# -- workers (one run each) ---------------------------------------------------------------------------
def worker_peftkit(spec: dict) -> dict:
    from accelerate.state import AcceleratorState

    from peftkit import recipe as R
    from peftkit.model.build import build
    from peftkit.step import kernels
    from peftkit.training.trainer import Trainer

    rec = R.from_dict(recipe(spec, defaults=spec["tool"] == "peftkit-defaults"))
    built = build(rec)
    device = "cuda" if _cuda() else "cpu"
    # What the trainer does once it calls kernels.apply (per-block compile, the padding-free default).
    model, kinfo = kernels.apply(built.model, rec, device)
    if kinfo["padding_free"] != rec.train.padding_free:
        built.recipe = rec.model_copy(update={"train": rec.train.model_copy(update={"padding_free": kinfo["padding_free"]})})
    meter = Meter(built.model, spec)
    with tempfile.TemporaryDirectory() as d:
        try:
            res = Trainer(built, d).fit()
        finally:  # accelerate keeps one mixed precision per process (in-process dry runs)
            AcceleratorState._reset_state(True)
    out = meter.result()
    mem = res["memory"]
    est = mem.get("estimate_at_measured_shape") or mem.get("estimate") or {}
    out.update(backbone=res["run"]["model"], kernels_apply=kinfo, params=res["params"],
               estimate_bytes=est.get("device_total_bytes", est.get("peak_bytes")),
               estimate_error=(mem.get("errors") or {}).get("estimate_vs_measured"),
               estimate_basis=(mem.get("errors") or {}).get("basis"),
               flops_per_token=res["speed"].get("model_flops_per_token"),
               loss_last=res["metrics"].get("train_loss"))
    return out


def _hf_model(spec: dict):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kw = {}
    if spec["strategy"] == "qlora":
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if spec["precision"] == "bf16" else torch.float32)
        kw["device_map"] = {"": 0 if _cuda() else "cpu"}
    dtype = torch.bfloat16 if spec["dtype"] == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=dtype, attn_implementation="sdpa", **kw)
    if spec["strategy"] == "full":
        return model
    import peft

    if spec["strategy"] == "qlora":
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                      target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))


def _hf_args(spec: dict, d: str, **extra):
    from transformers import TrainingArguments

    return dict(output_dir=d, per_device_train_batch_size=spec["batch"], learning_rate=1e-4, max_steps=spec["steps"],
                warmup_steps=0, lr_scheduler_type="linear", weight_decay=0.0, max_grad_norm=1.0,
                bf16=spec["precision"] == "bf16", use_cpu=not _cuda(), save_strategy="no", report_to="none",
                logging_steps=10, disable_tqdm=True, seed=0, dataloader_num_workers=0, optim="adamw_torch_fused",
                train_sampling_strategy="group_by_length", **extra), TrainingArguments


def worker_hf(spec: dict) -> dict:
    from transformers import DataCollatorForSeq2Seq, Trainer, set_seed

    set_seed(0)
    tok, train = tokenized(spec)
    model = _hf_model(spec)
    with tempfile.TemporaryDirectory() as d:
        kw, TrainingArguments = _hf_args(spec, d)
        trainer = Trainer(model=model, args=TrainingArguments(**kw), train_dataset=train,
                          data_collator=DataCollatorForSeq2Seq(tok, label_pad_token_id=-100), processing_class=tok)
        meter = Meter(model, spec)
        trainer.train()
    return meter.result()


def worker_trl(spec: dict) -> dict:
    """TRL's SFTTrainer on the same token ids; the loss on the response only (completion_mask)."""
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    set_seed(0)
    tok, train = tokenized(spec)
    train = train.map(lambda r: {"completion_mask": [int(x != -100) for x in r["labels"]]},
                      remove_columns=["labels"])
    model = _hf_model(spec)
    with tempfile.TemporaryDirectory() as d:
        kw, _ = _hf_args(spec, d, max_length=spec["seq"], completion_only_loss=True)
        kw.pop("train_sampling_strategy")
        trainer = SFTTrainer(model=model, args=SFTConfig(**kw), train_dataset=train, processing_class=tok)
        meter = Meter(model, spec)
        trainer.train()
    return meter.result()


def worker_unsloth(spec: dict) -> dict:
    """unsloth's FastLanguageModel + TRL, same rows; its own kernels (what a user of it gets)."""
    import unsloth  # noqa: F401  (patches transformers at import: first)
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer
    from unsloth import FastLanguageModel

    set_seed(0)
    tok, train = tokenized(spec)
    train = train.map(lambda r: {"completion_mask": [int(x != -100) for x in r["labels"]]}, remove_columns=["labels"])
    model, _ = FastLanguageModel.from_pretrained(spec["model"], max_seq_length=spec["seq"], dtype=None,
                                                 load_in_4bit=spec["strategy"] == "qlora",
                                                 full_finetuning=spec["strategy"] == "full")
    if spec["strategy"] != "full":
        model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, lora_dropout=0.0,
                                                 target_modules=LORA_TARGETS, use_gradient_checkpointing=False)
    with tempfile.TemporaryDirectory() as d:
        kw, _ = _hf_args(spec, d, max_length=spec["seq"], completion_only_loss=True)
        kw.pop("train_sampling_strategy")
        trainer = SFTTrainer(model=model, args=SFTConfig(**kw), train_dataset=train, processing_class=tok)
        meter = Meter(model, spec)
        trainer.train()
    return meter.result()


WORKERS = {"peftkit": worker_peftkit, "hf": worker_hf, "trl": worker_trl, "unsloth": worker_unsloth,
           "peftkit-defaults": worker_peftkit}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def worker_main(spec: dict) -> None:
    common.quiet()
    out = WORKERS[spec["tool"]](spec)
    common.emit(out)


# -- the parent: models, order, budget, summary -----------------------------------------------------
def tools(args) -> list[str]:
    out = ["peftkit", "hf"]
    out += [t for t in ("trl", "unsloth") if t in args.tools and importable(t)]
    return out + ["peftkit-defaults"]


def plan(args) -> list[tuple[str, str]]:
    wanted = [(s, st) for s in args.shapes for st in args.strategies]
    return [p for p in PRIORITY if p in wanted] + [p for p in wanted if p not in PRIORITY]


def run(args) -> dict:
    work = Path(args.work)
    t0, rows = time.time(), []
    peak = None
    if _cuda():
        from peftkit.step.flops import matmul_peak_flops

        peak = matmul_peak_flops()
    skipped_tools = [t for t in ("trl", "unsloth") if t in args.tools and not importable(t)]
    data_dir = None
    per_run = []  # wall seconds of finished runs: the budget's forecast
    for shape, strategy in plan(args):
        model_dir = make_model(shape, work / f"{shape}-bf16", args.tokenizer)
        data_dir = data_dir or make_rows(work / "rows", model_dir, args.n_train, args.prompt_words, args.response_words)
        for i, tool in enumerate(tools(args)):
            spec = {"tool": tool, "shape": shape, "strategy": strategy, "model": str(model_dir), "data": str(data_dir),
                    "steps": args.steps, "warmup": args.warmup, "batch": args.batch or BATCH.get(shape, 4),
                    "seq": args.seq, "target": args.target, "precision": args.precision, "dtype": args.dtype,
                    "profile": args.profile}
            forecast = statistics.median(per_run) if per_run else 0.0
            if time.time() - t0 + forecast > args.budget_s:
                rows.append({**spec, "error": f"skipped: time budget ({args.budget_s:.0f} s) spent"})
                continue
            t_run = time.time()
            try:
                res = common.run_worker(Path(__file__), spec, timeout=900) if not args.in_process else _in_process(spec)
                rows.append({**spec, **res})
            except Exception as e:  # a failed run is recorded with its error, the others still run
                rows.append({**spec, "error": f"{e.__class__.__name__}: {str(e)[-2000:]}"})
            per_run.append(time.time() - t_run)
            print(f"[{time.time() - t0:6.0f} s] {shape} {strategy} {tool}: "
                  f"{_tps(rows[-1]) or rows[-1].get('error', '')[:200]}", flush=True)
    _profiles(rows, args)
    return {"schema": SCHEMA, "dry_run": args.dry_run, "peak_bf16_matmul_flops": peak, "rows": rows,
            "skipped_tools": {t: "not importable" for t in skipped_tools},
            "targets": targets(rows, peak), "settings": {k: v for k, v in vars(args).items() if k != "out"}
            | {"out": str(args.out)}, "versions_extra": _versions()}


def _in_process(spec: dict) -> dict:
    out = WORKERS[spec["tool"]](spec)
    return json.loads(json.dumps(out, default=str))


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in EXTRA_PACKAGES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def _profiles(rows: list[dict], args) -> None:
    """Profiler tables beside the results (not in the JSON: they are long)."""
    tables = {f"{r['shape']}-{r['strategy']}-{r['tool']}": r.pop("profile_top") for r in rows if r.get("profile_top")}
    if not tables:
        return
    d = Path(args.out) / f"{args.name}.profile"
    d.mkdir(parents=True, exist_ok=True)
    for k, table in tables.items():
        (d / f"{k}.txt").write_text(table)
    print(f"profiles: {d}")


def _tps(r: dict):
    return (r.get("speed") or {}).get("tokens_per_s")


def targets(rows: list[dict], peak: float | None) -> list[dict]:
    """The issue's targets as pass/fail lines, computed from the rows (None: not measured)."""
    by = {(r["shape"], r["strategy"], r["tool"]): r for r in rows}
    out = []
    for (shape, strategy, tool), r in by.items():
        if tool not in ("peftkit", "peftkit-defaults"):
            continue
        hf = by.get((shape, strategy, "hf"))
        ratio = _tps(r) / _tps(hf) if _tps(r) and hf and _tps(hf) else None
        goal = TARGETS[strategy]
        out.append({"target": f"{shape} {strategy} {tool}: tokens/s >= {goal}x HF",
                    "value": ratio, "pass": None if ratio is None else ratio >= goal})
        p50, mx = r.get("step_p50_s"), r.get("step_max_s")
        worst = mx / p50 if p50 and mx else None
        out.append({"target": f"{shape} {strategy} {tool}: no steady step > {MAX_STEP_OVER_MEDIAN}x median",
                    "value": worst, "pass": None if worst is None else worst <= MAX_STEP_OVER_MEDIAN})
        if strategy == "full" and "8b" in shape:
            fpt = r.get("flops_per_token")
            mfu = _tps(r) * fpt / peak if _tps(r) and fpt and peak else None
            out.append({"target": f"{shape} full {tool}: MFU >= {MFU_TARGET:.0%} of measured bf16 peak",
                        "value": mfu, "pass": None if mfu is None else mfu >= MFU_TARGET})
    return out


def _gib(b):
    return common.fmt(b / 2**30, 2) if b else "–"


def markdown(data: dict, env: dict) -> str:
    lines = ["# peftkit vs HF Trainer + peft (+ TRL, unsloth) on one GPU", "",
             f"Random-weight models of real shapes, {data['settings']['steps']} steps "
             f"({data['settings']['warmup']} warm-up), seq {data['settings']['seq']}, bf16; "
             f"measured bf16 matmul peak {common.fmt((data['peak_bf16_matmul_flops'] or 0) / 1e12, 0)} TFLOP/s.", "",
             "| shape | strategy | tool | tokens/s | p50 / p90 / max step (s) | CUDA max alloc / reserved (GiB) "
             "| estimate (GiB), error | attention, kernels, padding-free |",
             "|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        if r.get("error"):
            lines.append(f"| {r['shape']} | {r['strategy']} | {r['tool']} | {r['error'][:120]} | | | | |")
            continue
        steps = " / ".join(common.fmt(r.get(k), 3) for k in ("step_p50_s", "step_p90_s", "step_max_s"))
        err = r.get("estimate_error")
        est = f"{_gib(r.get('estimate_bytes'))}, {err * 100:+.1f}%" if err is not None else "–"
        m, k = r.get("backbone") or {}, r.get("kernels_apply") or {}
        how = (f"{m.get('attn_implementation')}, {(m.get('kernels') or {}).get('used')}, {k.get('padding_free')}"
               if m else "sdpa, stock, no")
        lines.append(f"| {r['shape']} | {r['strategy']} | {r['tool']} | {common.fmt(_tps(r), 0)} | {steps} | "
                     f"{_gib(r.get('max_allocated_bytes'))} / {_gib(r.get('max_reserved_bytes'))} | {est} | {how} |")
    lines += ["", "## Targets (issue #25)", ""]
    for t in data["targets"]:
        mark = {True: "PASS", False: "FAIL", None: "n/a"}[t["pass"]]
        lines.append(f"- {mark}: {t['target']} (measured {common.fmt(t['value'], 3)})")
    if data["skipped_tools"]:
        lines.append("- not run: " + ", ".join(f"{k} ({v})" for k, v in data["skipped_tools"].items()))
    v = data["versions_extra"]
    lines += ["", "Also installed: " + ", ".join(f"{k} {x}" for k, x in v.items() if x)]
    return "\n".join(lines + common.environment_section(data, env))


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--shapes", nargs="+", default=["llama-3.2-1b", "llama-3.1-8b"])
    ap.add_argument("--strategies", nargs="+", default=["lora", "qlora", "full"], choices=["lora", "qlora", "full"])
    ap.add_argument("--tools", nargs="+", default=["trl", "unsloth"], help="optional tools, run when importable")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=None, help="default: 8 at 1B, 4 at 8B")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--target", type=int, default=100, help="response tokens kept (task.max_target_length)")
    ap.add_argument("--prompt-words", type=int, default=420)
    ap.add_argument("--response-words", type=int, default=100)
    ap.add_argument("--n-train", type=int, default=400)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--dtype", default="bf16", help="weights' storage dtype (every tool)")
    ap.add_argument("--tokenizer", default="builtin:minilm", help="any tokenizer whose vocabulary fits the shapes")
    ap.add_argument("--budget-s", type=float, default=480.0, help="no run starts that would end past this")
    ap.add_argument("--profile", action="store_true", help="torch.profiler over 3 steady steps of every row")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "peftkit-side-by-side"))
    ap.add_argument("--out", type=Path, default=common.RESULTS)
    ap.add_argument("--name", default="gpu_side_by_side")
    ap.add_argument("--in-process", action="store_true", help="runs in this process (dry runs; not for numbers)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny llama, a few steps, in-process")
    a = ap.parse_args(argv)
    if a.dry_run:
        a.shapes, a.steps, a.warmup, a.seq, a.target = ["tiny"], 4, 1, 64, 16
        a.prompt_words, a.response_words, a.n_train, a.in_process = 40, 10, 32, True
        if not _cuda():  # bf16 on a CPU without native bf16 is ~15x slower; the dry run checks the plumbing
            a.precision, a.dtype = "fp32", "fp32"
        a.tokenizer, a.budget_s = "builtin:minilm", 1e9
    a.smoke = False
    return a


def main(argv=None):
    a = parse(argv)
    if a.worker:
        return worker_main(json.loads(a.worker))
    common.quiet()
    common.run_and_publish(a, run, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
