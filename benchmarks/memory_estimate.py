"""Estimated vs measured peak memory of one training step.

(a) CPU: MiniLM (builtin:minilm, classification) and SmolLM2-135M (builtin:smollm2, causal LM),
    every strategy, three batch shapes, fp32: the estimate (fake tensors, before any weight
    loads) vs the measured live-tensor peak of a real step after one warm-up step (the same
    step the trainer measures: forward, backward, grad clipping, AdamW step, zero_grad).
(b) Published GPU peaks (torchtune), estimated offline with ``--device cuda`` from the
    catalogue: the settings assumed per row are in the table; rows that depend on features
    peftkit does not model are listed with the reason.

    python benchmarks/memory_estimate.py            # both tables -> benchmarks/results/
    python benchmarks/memory_estimate.py --only gpu
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import env_lines, environment, fmt, publish, quiet  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FP32 = ["train.precision=fp32", "model.compute_dtype=fp32", "model.dtype=fp32"]
CPU_MODELS = {  # recipe, shapes (batch, seq)
    "minilm": ("recipes/quickstart.yaml", [(8, 32), (16, 64), (32, 64)]),
    "smollm2": ("recipes/sft/sentiment-lora.yaml", [(1, 32), (2, 64), (4, 64)]),
}
STRATEGIES = ["full", "freeze", "lora", "qlora", "adapter", "prefix", "ia3", "bitfit"]


def measure(built, batch: int, seq: int) -> dict:
    """Live peak of one real step after a warm-up step, as the trainer measures it."""
    from peftkit import memory
    from peftkit.optim import make_optimizer

    model, tc = built.model, built.recipe.train
    model.train()
    opt = make_optimizer(model, tc)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, built.tokenizer.vocab_size, (batch, seq), generator=g)
    causal = built.task.kind == "causal_lm"
    kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
          "labels": ids.clone() if causal else torch.zeros(batch, dtype=torch.long)}
    probe = memory.StepPeak(at=2)
    for step in (1, 2):
        with probe.around(step, model, opt, (batch, seq)):
            loss = model(**kw).loss
            loss.backward()
            del loss
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], tc.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
    return probe.result


def cpu_rows() -> list[dict]:
    from peftkit import recipe as R
    from peftkit.build import build
    from peftkit.errors import UserError
    from peftkit.estimate import estimate

    rows = []
    for model, (path, shapes) in CPU_MODELS.items():
        for strategy in STRATEGIES:
            try:
                built = build(R.load(str(ROOT / path), [f"strategy.name={strategy}", *FP32]))
            except UserError as e:
                rows.append({"model": model, "strategy": strategy, "skipped": str(e)})
                continue
            for b, s in shapes:
                live = measure(built, b, s)
                est = estimate(built.recipe, batch_size=b, seq_len=s, task=built.task, tokenizer=built.tokenizer)
                err = (est["peak_bytes"] - live["peak_bytes"]) / live["peak_bytes"]
                rows.append({"model": model, "strategy": strategy, "batch": b, "seq": s,
                             "estimate_bytes": est["peak_bytes"], "measured_bytes": live["peak_bytes"],
                             "error": err, "estimate_at_peak": est["at_peak"], "measured_at_peak": live["at_peak"]})
                print(f"{model} {strategy} {b}x{s}: est {est['peak_bytes'] / 2**20:.1f} MiB, "
                      f"measured {live['peak_bytes'] / 2**20:.1f} MiB, {100 * err:+.1f}%", flush=True)
            del built
    return rows


# torchtune's published peaks. GiB: torchtune logs torch.cuda.max_memory_allocated() / 2**30.
LLAMA32_3B = ["model.name=catalog:llama-3.2-3b", "train.batch_size=2", "task.max_length=4096"]
LORA_TT = ["strategy.r=64", "strategy.alpha=128",  # torchtune 3B_lora: q, v, output_proj + MLP, r64
           "strategy.target_modules=[q_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"]
GPU_ROWS = [
    ("README opt. flags: Llama-3.2-3B full, baseline", 25.5, "GiB",
     [*LLAMA32_3B, "strategy.name=full", "train.optimizer=adamw"],
     "bf16 weights, grads and AdamW state (torch AdamW keeps state in the param dtype), no AC, batch 2 x 4096"),
    ("README opt. flags: Llama-3.2-3B LoRA", 8.5, "GiB",
     [*LLAMA32_3B, "strategy.name=lora", *LORA_TT, "model.gradient_checkpointing=true"],
     "bf16, LoRA r64 on q,v,o + MLP, activation checkpointing; the published row also has packing, "
     "compile, chunked CE, activation offloading (not modelled)"),
    ("README opt. flags: Llama-3.2-3B QLoRA", 4.6, "GiB",
     [*LLAMA32_3B, "strategy.name=qlora", *LORA_TT, "model.gradient_checkpointing=true"],
     "nf4 backbone, LoRA r64 on q,v,o + MLP, activation checkpointing; the published row also has packing, "
     "compile, chunked CE, activation offloading (not modelled)"),
    ("LoRA tutorial: Llama-2-7B LoRA q,v r8", 15.57, "GB",
     ["model.name=catalog:llama-2-7b", "train.batch_size=2", "task.max_length=1024", "strategy.name=lora",
      "strategy.r=8", "strategy.alpha=16", "strategy.target_modules=[q_proj,v_proj]", "model.gradient_checkpointing=true"],
     "7B_lora_single_device: bf16, AC on, batch 2; Alpaca's longest batch assumed 1024 tokens"),
    ("LoRA tutorial: Llama-2-7B LoRA all layers r64", 17.04, "GB",
     ["model.name=catalog:llama-2-7b", "train.batch_size=2", "task.max_length=1024", "strategy.name=lora",
      "strategy.r=64", "strategy.alpha=128", "model.gradient_checkpointing=true",
      "strategy.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head]"],
     "as above, LoRA r64 on every linear incl. the output projection"),
    ("QLoRA tutorial: Llama-2-7B QLoRA", 9.29, "GB",
     ["model.name=catalog:llama-2-7b", "train.batch_size=2", "task.max_length=1024", "strategy.name=qlora",
      "strategy.r=8", "strategy.alpha=16", "strategy.target_modules=[q_proj,k_proj,v_proj,o_proj]",
      "model.gradient_checkpointing=true"],
     "7B_qlora_single_device: nf4, LoRA r8 on q,k,v,o, AC on, batch 2, 1024 tokens assumed"),
]
NOT_REPRODUCIBLE = [
    ("README opt. flags: + packed / + compile / + chunked cross-entropy / + optimizer in backward / "
     "+ activation offloading rows", "peftkit models none of torch.compile's fusion, chunked CE, "
     "optimizer-in-backward or CPU activation offloading; and the published values of those rows are "
     "not in this environment (no web access) - only the three rows above were given."),
    ("README opt. flags: + 8-bit AdamW row", "estimable (train.optimizer=adamw8bit) but its published value "
     "was not available here, so it is not compared."),
]


def gpu_rows() -> list[dict]:
    from peftkit import catalog
    from peftkit import recipe as R
    from peftkit.estimate import estimate

    rows = []
    for name, published, unit, overrides, settings in GPU_ROWS:
        r = R.load(str(catalog.HERE / "default.yaml"), ["model.dtype=bf16", "train.precision=bf16", *overrides])
        e = estimate(r, device="cuda")
        scale = 2**30  # torchtune's "GB" is max_memory_allocated / 2**30 too
        est = e["peak_bytes"] / scale
        rows.append({"row": name, "settings": settings, "overrides": overrides, "published": published, "unit": unit,
                     "estimated": est, "device_total": e["device_total_bytes"] / scale,
                     "error": (est - published) / published, "at_peak": e["at_peak"], "seconds": e["seconds"]})
        print(f"{name}: published {published} {unit}, estimated {est:.2f} ({100 * rows[-1]['error']:+.1f}%)",
              flush=True)
    return rows


def markdown(cpu: list[dict] | None, gpu: list[dict] | None, env: dict) -> str:
    out = ["# Estimated vs measured peak memory of one training step", "", *env_lines(env), ""]
    if cpu is not None:
        ok = [r for r in cpu if "skipped" not in r]
        worst = max((abs(r["error"]) for r in ok), default=0)
        out += ["## (a) CPU, fp32: estimate vs measured live-tensor peak", "",
                f"{len(ok)} rows, worst |error| {100 * worst:.1f}% (target <= 10% each row).", "",
                "| model | strategy | batch x seq | estimate (MiB) | measured (MiB) | error |", "|---|---|---|---|---|---|"]
        for r in cpu:
            if "skipped" in r:
                out.append(f"| {r['model']} | {r['strategy']} | – | – | – | n/a: {r['skipped']} |")
            else:
                out.append(f"| {r['model']} | {r['strategy']} | {r['batch']} x {r['seq']} | "
                           f"{fmt(r['estimate_bytes'] / 2**20)} | {fmt(r['measured_bytes'] / 2**20)} | "
                           f"{100 * r['error']:+.1f}% |")
        out.append("")
    if gpu is not None:
        out += ["## (b) Published GPU peaks (torchtune, one A100) vs `peftkit estimate --device cuda`", "",
                "Estimated = peak of allocated tensor memory (max_memory_allocated's counterpart, 512 B blocks, "
                "no CUDA context), from the offline catalogue, no weights loaded. Published values are "
                "from the brief (no web access here); GB read as GiB (torchtune divides by 2**30).", "",
                "| row | settings assumed | published | estimated | error |", "|---|---|---|---|---|"]
        for r in gpu:
            out.append(f"| {r['row']} | {r['settings']} | {r['published']} {r['unit']} | {r['estimated']:.2f} | "
                       f"{100 * r['error']:+.1f}% |")
        out += ["", "Not reproduced:", ""] + [f"- {a}: {b}" for a, b in NOT_REPRODUCIBLE]
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["cpu", "gpu"])
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    quiet()
    torch.manual_seed(0)
    env = environment()
    cpu = cpu_rows() if args.only in (None, "cpu") else None
    gpu = gpu_rows() if args.only in (None, "gpu") else None
    name = "memory_estimate" + (f"_{args.only}" if args.only else "")
    publish(name, {"env": env, "cpu": cpu, "gpu": gpu}, markdown(cpu, gpu, env), write=not args.no_write)


if __name__ == "__main__":
    main()
