#!/usr/bin/env python
"""Will it fit? The estimate's verdict against what happened, on one GPU.

A grid of catalogue model shapes (random weights, built from config directly on the device:
no download), strategies (lora, full), batch shapes and memory caps: 16/24/40/80 GiB cards
emulated with ``torch.cuda.set_per_process_memory_fraction`` plus caps placed on purpose
within +-10% of each case's predicted reserved peak (the borderline cases). Every case runs two
training steps in a fresh subprocess (bf16 weights and autocast, SDPA, the recipe's optimizer)
and records whether it ran out of memory, and without a cap the measured
``max_memory_allocated`` / ``max_memory_reserved`` of step 2 against the prediction.
``train.micro_batch_size: auto`` cases: the chosen micro-batch must run, and four times it must
not (so the choice is within one power of two of the largest that fits).

    python benchmarks/fit_check.py                 # GPU: results -> benchmarks/results/fit_check.{json,md}
    python benchmarks/fit_check.py --dry-run       # CPU: tiny shapes, the live-tensor peak as the
                                                   # measurement, "OOM" = peak over the cap

Targets (printed): allocated error within +-5% on every measured row; verdict right on >= 95%
of the rows with a definite verdict ("tight" rows are counted apart) and never "fits" for a
run that ran out of memory; micro_batch auto never OOMs and is within one power of two.
QLoRA rows are left out: bitsandbytes is not on the GPU machine (GPU.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts this checkout's peftkit first on the path)

SCHEMA = "peftkit.fit_check/1"
GiB = 2**30
CARDS = [16, 24, 40, 80]  # GiB
BORDER = (0.93, 1.07)  # caps at these multiples of the predicted reserved peak
TARGETS = {"allocated_error": 0.05, "verdict_right": 0.95}
BASE = {
    "name": "fit-check",
    "model": {"dtype": "bf16", "attn_implementation": "sdpa"},
    "task": {"kind": "causal_lm", "data": {"source": "builtin:rotten-tomatoes"}, "response_column": "label",
             "prompt": "Review: {text}\nSentiment:", "max_target_length": 16},
    "strategy": {"name": "lora", "r": 16, "alpha": 32},
    "train": {"precision": "bf16", "optimizer": "adamw_fused", "progress": False},
}
# (model, strategy, batch, seq, model overrides)
GPU_GRID = [
    ("smollm2-135m", "lora", 8, 512, {}), ("smollm2-135m", "lora", 32, 512, {}), ("smollm2-135m", "full", 16, 512, {}),
    ("qwen2.5-0.5b", "lora", 8, 1024, {}), ("qwen2.5-0.5b", "full", 8, 512, {}),
    ("llama-3.2-1b", "lora", 8, 512, {}), ("llama-3.2-1b", "full", 8, 512, {}),
    ("llama-3.2-1b", "lora", 16, 1024, {"gradient_checkpointing": True}),
    ("llama-3.2-3b", "lora", 4, 1024, {}), ("llama-3.2-3b", "full", 2, 512, {}),
    ("llama-3.1-8b", "lora", 4, 512, {}), ("llama-3.1-8b", "lora", 8, 1024, {"gradient_checkpointing": True}),
]
GPU_AUTO = [("llama-3.2-1b", "lora", 64, 512, 24), ("llama-3.1-8b", "lora", 32, 512, 40),
            ("smollm2-135m", "full", 128, 512, 16)]  # (..., global batch, seq, card GiB)
TINY = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "vocab_size": 1024,
        "max_position_embeddings": 512, "tie_word_embeddings": False, "pad_token_id": 0, "bos_token_id": 101,
        "eos_token_id": 102}  # MiniLM's tokenizer for its special ids (shapes only: the ids stay < 1024)
CPU_GRID = [("tiny", "lora", 4, 32, {}), ("tiny", "full", 8, 64, {})]
CPU_AUTO = [("tiny", "full", 32, 32, None)]
CPU_TRAIN = {"precision": "fp32"}  # fp32 on any CPU (bf16 is ~15x slower on AVX2-only machines)


def recipe(model: str, strategy: str, batch: int, seq: int, model_over: dict, **train) -> dict:
    r = json.loads(json.dumps(BASE))
    if not model.startswith("catalog:"):  # the dry run's tiny model
        r["model"]["dtype"], r["train"] = "fp32", {**r["train"], **CPU_TRAIN}
    r["model"].update(name=model, **model_over)
    r["task"]["max_length"] = seq
    r["strategy"] = {"name": strategy, **({"r": 16, "alpha": 32} if strategy == "lora" else {})}
    r["train"].update(batch_size=batch, **train)
    return r


# -- the worker: one case in a fresh process ----------------------------------------------------
def real_model(rec, device: str):
    """The recipe's model with random weights built on ``device`` from its config, as training has it."""
    import torch

    from peftkit import hardware, strategies, tasks
    from peftkit.estimate import trace
    from peftkit.model import backbone

    config = trace._config(rec.model)
    task = tasks.get(rec.task, trace._tokens(config, None))
    for k, v in task.model_kwargs().items():
        setattr(config, k, v)
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = task.tokenizer.pad_token_id
    auto = task.auto_class()
    with torch.device(device):
        model = auto.from_config(config, dtype=backbone.DTYPES[rec.model.dtype],
                                 attn_implementation=backbone.attention_impl(rec.model.attn_implementation,
                                                                             backbone.DTYPES[rec.model.dtype]))
    if rec.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = strategies.get(rec.strategy).apply(model, task.head(model))
    if (frozen := hardware.frozen_dtype(rec)) is not None:
        strategies.cast_frozen(model, frozen)
    return model.to(device).train(), task, auto.__name__, config


def worker(spec: dict) -> dict:
    """Two training steps (micro-steps as the estimate traces them); the peaks of step 2, or OOM."""
    import torch

    from peftkit import hardware
    from peftkit import recipe as R
    from peftkit.estimate import trace
    from peftkit.step import memory
    from peftkit.step.optim import make_optimizer

    common.quiet()
    cuda = spec["device"] == "cuda"
    if cuda and spec.get("cap"):
        torch.cuda.set_per_process_memory_fraction(spec["cap"] / torch.cuda.get_device_properties(0).total_memory)
    rec = hardware.pinned(R.from_dict(spec["recipe"]))
    tc, out = rec.train, {"oom": False}
    t0 = time.time()
    try:
        model, task, auto_name, config = real_model(rec, spec["device"])
        opt = make_optimizer(model, tc)
        g = torch.Generator().manual_seed(0)
        batch = trace._fake_batch(auto_name, spec["batch"], spec["seq"], False)
        batch["input_ids"] = torch.randint(0, config.vocab_size, batch["input_ids"].shape, generator=g)
        batch["labels"] = batch["input_ids"].clone()
        batch = {k: v.to(spec["device"]) for k, v in batch.items()}
        probe = memory.StepPeak(at=0 if cuda else 2)  # CPU: the live-tensor peak is the measurement
        for step in (1, 2):
            if cuda and step == 2:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            with probe.around(step, model, opt, (spec["batch"], spec["seq"])):
                for _ in range(min(tc.grad_accum, 2)):
                    with torch.autocast(spec["device"], dtype=torch.bfloat16, enabled=tc.precision == "bf16"):
                        loss = task.train_loss(model, batch)
                    loss.backward()
                    del loss
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], tc.max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
            out.update(allocated=torch.cuda.max_memory_allocated(), reserved=torch.cuda.max_memory_reserved())
        else:
            out.update(allocated=probe.result["peak_bytes"], reserved=probe.result["peak_bytes"])
            out["oom"] = bool(spec.get("cap")) and out["allocated"] > spec["cap"]  # emulated
    except (torch.OutOfMemoryError, RuntimeError) as e:  # cuBLAS reports a failed workspace as a RuntimeError
        if "out of memory" not in str(e).lower() and "ALLOC_FAILED" not in str(e):
            raise
        out.update(oom=True, error=str(e).splitlines()[0][:300])
    out["seconds"] = round(time.time() - t0, 2)
    return out


def tiny_model(d: Path) -> None:
    """A config-only tiny decoder directory (the dry run's shapes) with a tokenizer."""
    from transformers import AutoTokenizer

    from peftkit.assets import locate

    (d / "config.json").write_text(json.dumps(TINY))
    tok = AutoTokenizer.from_pretrained(locate("builtin:minilm").parent)
    tok.eos_token, tok.bos_token = "[SEP]", "[CLS]"
    tok.save_pretrained(d)


# -- the parent: predictions, cases, scheduling ---------------------------------------------------
class Predictor:
    """Estimators per (model, strategy, model overrides), reused across shapes and caps."""

    def __init__(self, device: str):
        self.device, self.cache = device, {}

    def estimator(self, rec_dict: dict):
        from peftkit import recipe as R
        from peftkit.estimate.trace import Estimator

        key = json.dumps({k: rec_dict[k] for k in ("model", "strategy")}, sort_keys=True)
        if key not in self.cache:
            self.cache[key] = Estimator(R.from_dict(rec_dict), self.device)
        return self.cache[key]

    def at(self, rec_dict: dict, batch: int, seq: int) -> dict:
        return self.estimator(rec_dict).at(batch, seq)


def plan(grid, auto, dry: bool, pred: Predictor, model_name) -> tuple[list[dict], list[dict]]:
    from peftkit.estimate import fit

    cases, autos = [], []
    for model, strategy, b, s, over in grid:
        rec = recipe(model_name(model), strategy, b, s, over)
        e = pred.at(rec, b, s)
        reserved = e.get("reserved_peak_bytes", e["peak_bytes"])
        caps = [None] + [int(reserved * f) for f in BORDER]
        if not dry:
            below = [c * GiB for c in CARDS if c * GiB < reserved]
            above = [c * GiB for c in CARDS if c * GiB >= reserved]
            caps += below[-1:] + above[:1]
        else:
            caps += [int(reserved * 0.5)]
        for cap in caps:
            v = fit.verdict(e, cap, context=False)["verdict"] if cap else "fits"
            cases.append({"model": model, "strategy": strategy, "batch": b, "seq": s, "model_overrides": over,
                          "cap": cap, "recipe": rec, "predicted_allocated": e["peak_bytes"],
                          "predicted_reserved": reserved, "verdict": v,
                          "borderline": bool(cap) and abs(reserved - cap) <= 0.10 * cap})
    for model, strategy, gb, s, card in auto:
        rec = recipe(model_name(model), strategy, gb, s, {}, micro_batch_size="auto")
        from peftkit import recipe as R

        r = R.from_dict(rec)
        est = pred.estimator(rec)
        cap = card * GiB if card else int(pred.at(rec, 4, s).get("reserved_peak_bytes", 0) * 1.2) or None
        if cap is None:  # CPU: a cap between micro-batches 4 and 8
            cap = int(pred.at(rec, 4, s)["peak_bytes"] * 1.2)
        c = fit.choose_micro_batch(r, fit.Capacity(cap, False, "cap", pred.device), estimator=est)
        group = {"model": model, "strategy": strategy, "global_batch": gb, "seq": s, "cap": cap,
                 "micro": c.micro, "accum": c.accum, "why": c.why, "runs": []}
        for m in (c.micro, 2 * c.micro, 4 * c.micro):
            if m <= gb:  # each with its accumulation (two micro-steps run: the peak is in the second)
                e = pred.estimator(rec).at(m, s, accum=gb // m)
                run_rec = recipe(model_name(model), strategy, m, s, {}, grad_accum=gb // m)
                group["runs"].append({"model": model, "strategy": strategy, "batch": m, "seq": s, "cap": cap,
                                      "model_overrides": {}, "recipe": run_rec,
                                      "predicted_allocated": e["peak_bytes"],
                                      "predicted_reserved": e.get("reserved_peak_bytes", e["peak_bytes"]),
                                      "verdict": fit.verdict(e, cap, context=False)["verdict"], "auto": m == c.micro})
        autos.append(group)
    return cases, autos


def run_all(specs: list[dict], device: str, fresh: bool, deadline: float, parallel: int, mem_pool: int) -> None:
    """Each spec in a fresh process (GPU: several at once while their caps sum within ``mem_pool``)."""
    lock, cond = threading.Lock(), threading.Condition(threading.Lock())
    held = [0]

    def one(spec):
        if time.time() > deadline:
            spec["result"] = {"skipped": "past the time budget"}
            return
        need = min(spec["cap"] or mem_pool, mem_pool)
        with cond:
            cond.wait_for(lambda: held[0] + need <= mem_pool)
            held[0] += need
        try:
            w = {"device": device, "cap": spec["cap"], "batch": spec["batch"], "seq": spec["seq"], "recipe": spec["recipe"]}
            spec["result"] = (common.run_worker(Path(__file__), w, timeout=300) if fresh else worker(w))
        except Exception as e:  # noqa: BLE001 - recorded, the grid goes on
            spec["result"] = {"error": f"{e.__class__.__name__}: {str(e)[-500:]}"}
        finally:
            with cond:
                held[0] -= need
                cond.notify_all()
        with lock:
            r = spec["result"]
            print(f"{spec['model']} {spec['strategy']} {spec['batch']}x{spec['seq']} cap "
                  f"{(spec['cap'] or 0) / GiB:.2f} GiB: predicted {spec['verdict']}, "
                  f"{'OOM' if r.get('oom') else r.get('error') or r.get('skipped') or 'ran'}", flush=True)

    if fresh and parallel > 1:
        with ThreadPoolExecutor(parallel) as ex:
            list(ex.map(one, sorted(specs, key=lambda s: -(s["cap"] or mem_pool))))
    else:
        for s in specs:
            one(s)


def score(cases: list[dict], autos: list[dict]) -> dict:
    done = [c for c in cases if "oom" in c.get("result", {})]
    measured = [c for c in done if not c["cap"] and not c["result"]["oom"]]
    for c in measured:
        c["allocated_error"] = (c["predicted_allocated"] - c["result"]["allocated"]) / c["result"]["allocated"]
        c["reserved_error"] = (c["predicted_reserved"] - c["result"]["reserved"]) / c["result"]["reserved"]
    definite = [c for c in done if c["verdict"] != "tight"]
    right = [c for c in definite if (c["verdict"] == "fits") != c["result"]["oom"]]
    auto_ok = []
    for g in autos:
        runs = {r["batch"]: r.get("result", {}) for r in g["runs"]}
        chosen_ran = runs.get(g["micro"], {}).get("oom") is False
        four = runs.get(4 * g["micro"])
        g["chosen_ran"], g["within_one_power"] = chosen_ran, four is None or four.get("oom") is True
        auto_ok.append(chosen_ran and g["within_one_power"])
    worst = max((abs(c["allocated_error"]) for c in measured), default=None)
    return {
        "rows": len(done), "measured_rows": len(measured), "definite": len(definite), "right": len(right),
        "tight": len(done) - len(definite), "borderline": sum(c["borderline"] for c in done),
        "fits_but_oom": sum(c["verdict"] == "fits" and c["result"]["oom"] for c in done),
        "tight_oom": sum(c["verdict"] == "tight" and c["result"]["oom"] for c in done),
        "worst_allocated_error": worst,
        "targets": {
            "allocated_within_5pct_every_row": worst is not None and worst <= TARGETS["allocated_error"],
            "verdict_right_95pct": bool(definite) and len(right) / len(definite) >= TARGETS["verdict_right"],
            "never_fits_when_oom": not any(c["verdict"] == "fits" and c["result"]["oom"] for c in done),
            "auto_never_ooms_within_one_power": bool(auto_ok) and all(auto_ok),
        },
    }


def markdown(data: dict) -> str:
    s, env = data["summary"], data["env"]
    gib = lambda b: "–" if b is None else f"{b / GiB:.2f}"  # noqa: E731
    worst = "–" if s["worst_allocated_error"] is None else f"{100 * s['worst_allocated_error']:.1f}%"
    out = ["# Will it fit? The estimate's verdict against what happened", "",
           f"{'DRY RUN on CPU (tiny shapes; live-tensor peak, OOM emulated as peak > cap)' if data['dry_run'] else 'GPU'}"
           f"; {s['rows']} rows ({s['borderline']} borderline: cap within ±10% of the predicted reserved peak), "
           f"{s['measured_rows']} measured without a cap; margin {data['margin']:.0%}.", "",
           f"- allocated error, worst |error|: {worst}"
           f" (target ≤ 5% every row): {'MET' if s['targets']['allocated_within_5pct_every_row'] else 'NOT MET'}",
           f"- verdict right on {s['right']} of {s['definite']} definite rows ({s['tight']} 'tight', of which "
           f"{s['tight_oom']} ran out of memory) (target ≥ 95%): {'MET' if s['targets']['verdict_right_95pct'] else 'NOT MET'}",
           f"- 'fits' but ran out of memory: {s['fits_but_oom']} (target 0): "
           f"{'MET' if s['targets']['never_fits_when_oom'] else 'NOT MET'}",
           f"- micro_batch auto never OOMs, within one power of two: "
           f"{'MET' if s['targets']['auto_never_ooms_within_one_power'] else 'NOT MET'}", "",
           "| model | strategy | batch x seq | cap (GiB) | predicted alloc / reserved (GiB) | verdict | happened | "
           "measured alloc / reserved (GiB) | alloc error | reserved error |", "|---|---|---|---|---|---|---|---|---|---|"]
    for c in data["cases"]:
        r = c.get("result", {})
        happened = "OOM" if r.get("oom") else (r.get("error") or r.get("skipped") or "ran")
        err = lambda k: f"{100 * c[k]:+.1f}%" if k in c else "–"  # noqa: E731
        out.append(f"| {c['model']} | {c['strategy']}{' gc' if c['model_overrides'].get('gradient_checkpointing') else ''}"
                   f" | {c['batch']} x {c['seq']} | {gib(c['cap']) if c['cap'] else 'none'}"
                   f"{' (border)' if c['borderline'] else ''} | {gib(c['predicted_allocated'])} / "
                   f"{gib(c['predicted_reserved'])} | {c['verdict']} | {happened} | "
                   f"{gib(r.get('allocated')) if not c['cap'] else '–'} / {gib(r.get('reserved')) if not c['cap'] else '–'}"
                   f" | {err('allocated_error')} | {err('reserved_error')} |")
    out += ["", "## train.micro_batch_size: auto", "",
            "| model | strategy | global batch x seq | cap (GiB) | chosen | chosen ran | 2x / 4x | ok |",
            "|---|---|---|---|---|---|---|---|"]
    for g in data["auto"]:
        res = {r["batch"]: r.get("result", {}) for r in g["runs"]}
        tag = lambda m: "–" if m not in res else ("OOM" if res[m].get("oom") else "ran")  # noqa: E731
        out.append(f"| {g['model']} | {g['strategy']} | {g['global_batch']} x {g['seq']} | {gib(g['cap'])} | "
                   f"{g['micro']} x {g['accum']} | {g.get('chosen_ran')} | {tag(2 * g['micro'])} / {tag(4 * g['micro'])}"
                   f" | {g.get('chosen_ran') and g.get('within_one_power')} |")
    out += ["", "## Environment", "", *common.env_lines(env),
            f"- wall {data['wall_s'] / 60:.1f} min"
            + ("" if data["dry_run"] else f"; GPU {env['device_name']} ({env['gpu_memory_bytes'] / GiB:.1f} GiB, "
               f"sm {env['capability']}), PYTORCH_CUDA_ALLOC_CONF={env['alloc_conf']}"), ""]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, the CPU measurement (fast)")
    ap.add_argument("--fresh", action="store_true", help="dry run: every case in its own process, as on a GPU")
    ap.add_argument("--budget-s", type=float, default=450, help="no case starts after this many seconds")
    ap.add_argument("--parallel", type=int, default=4, help="GPU: cases at once (their caps share --pool-gib)")
    ap.add_argument("--pool-gib", type=float, default=120, help="GPU: caps of concurrent cases sum within this")
    ap.add_argument("--out", type=Path, default=common.RESULTS)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        common.emit(worker(json.loads(a.worker)))
        return 0
    import torch

    common.quiet()
    t0 = time.time()
    dry = a.dry_run
    if not dry and not torch.cuda.is_available():
        print("fit_check: no CUDA device (use --dry-run on a CPU)", file=sys.stderr)
        return 2
    device = "cpu" if dry else "cuda"
    env = common.environment()
    if not dry:
        env["device_name"] = torch.cuda.get_device_name()
        env["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        env["alloc_conf"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
    tiny_dir = Path(tempfile.mkdtemp(prefix="fit-check-tiny-"))
    if dry:
        tiny_model(tiny_dir)
    model_name = (lambda m: str(tiny_dir)) if dry else (lambda m: f"catalog:{m}")
    pred = Predictor(device)
    from peftkit.estimate import fit

    cases, autos = plan(CPU_GRID if dry else GPU_GRID, CPU_AUTO if dry else GPU_AUTO, dry, pred, model_name)
    print(f"planned {len(cases)} cases + {sum(len(g['runs']) for g in autos)} auto runs in "
          f"{time.time() - t0:.0f} s", flush=True)
    deadline = t0 + a.budget_s
    run_all(cases + [r for g in autos for r in g["runs"]], device, a.fresh or not dry, deadline,
            1 if dry else a.parallel, int(a.pool_gib * GiB))
    data = {"schema": SCHEMA, "dry_run": dry, "margin": fit.MARGIN, "cases": cases, "auto": autos,
            "summary": score(cases, autos), "env": env}
    data["env"]["loadavg_end"] = os.getloadavg()
    data["wall_s"] = time.time() - t0
    for c in data["cases"] + [r for g in autos for r in g["runs"]]:
        c.pop("recipe", None)
    common.publish("fit_check" + ("_dry_run" if dry else ""), data, markdown(data), a.out)
    print("targets: " + json.dumps(data["summary"]["targets"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
