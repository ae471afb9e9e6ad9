"""torchtune's published GPU peaks, each with the settings read from torchtune's own files.

Sources (repository pytorch/torchtune, path @ commit, as stored by the search tool):

- [readme] README.md @ a9ea6d5bf023ebebca7a8ec7981099b03696c67a, "Optimization flags": Llama 3.2 3B,
  recipe full_finetune_single_device, batch 2, max sequence length 4096, bf16, one A100;
  "each technique is added on top of the previous one, except for LoRA and QLoRA, which do
  not use optimizer_in_bwd or AdamW8bit"; column "Peak Memory Active (GiB)". The command
  given for the last row: 3B_qlora_single_device + dataset.packed=True compile=True
  loss=CEWithChunkedOutputLoss enable_activation_checkpointing=True optimizer_in_bwd=False
  enable_activation_offloading=True optimizer=torch.optim.AdamW tokenizer.max_seq_len=4096
  gradient_accumulation_steps=1 batch_size=2.
- [full3b] recipes/configs/llama3_2/3B_full_single_device.yaml @ 03a19788a5ddba7d3ddea2a40f7ec952d3f4d558:
  alpaca_dataset (tatsu-lab/alpaca), packed False; defaults PagedAdamW8bit, optimizer_in_bwd
  True, activation checkpointing True (the table's baseline turns these off, its later rows on).
- [lora3b] recipes/configs/llama3_2/3B_lora_single_device.yaml @ 2324983f767ad492b9820c5077304f320c971c4d:
  LoRA on q_proj, v_proj, output_proj + MLP, rank 64, alpha 128, dropout 0; AdamW fused=True;
  alpaca_cleaned_dataset.
- [qlora3b] recipes/configs/llama3_2/3B_qlora_single_device.yaml @ 033177875786d2530912185c5c7ceccaadd1d615:
  the same with qlora_llama3_2_3b (NF4 base only where LoRA is applied), apply_lora_to_output False.
- [mem] torchtune/training/memory.py @ 631391dc3130443270fc148cc5773d2924c886ff: GiB = 1024**3;
  "active" = memory_stats()["active_bytes.all.peak"] (max_memory_allocated's sibling), peaks
  reset at every log.
- [lora-tut] docs/source/tutorials/lora_finetune.rst @ 14b59e7a1d0115eb2df8a009f8b7d5c7c41241a4: Llama-2-7B
  with llama2/7B_lora_single_device (batch 2): Q and V r8 a16 15.57 GB; all layers
  (q, k, v, output_proj, MLP and the output projection) r64 a128 17.04 GB.
- [qlora-tut] docs/source/tutorials/qlora_finetune.rst @ 0e44fed1e1683921cb03f989f6ba3cd0ee6c56f8: the
  same numbers are "Peak memory reserved, training": LoRA 15.57 GB, QLoRA 9.29 GB, and at
  model init (before any step) 13.98 GB and 9.13 GB reserved.
- [lora7b] recipes/configs/llama2/7B_lora_single_device.yaml @ 04dc3801de964fa585e7fe41801f030b656d0caa:
  q_proj, v_proj r8 a16, batch 2, AdamW, torch.nn.CrossEntropyLoss, activation checkpointing,
  bf16, alpaca_cleaned_dataset.
- [qlora7b] recipes/configs/llama2/7B_qlora_single_device.yaml @ 0031bfb080bd35ec533c412df883cf2bf7bf7fe4:
  q_proj, v_proj, k_proj, output_proj + MLP r8 a16, batch 2, activation checkpointing, bf16.
- [alpaca] torchtune/datasets/_alpaca.py @ 0432b3a5d5a31c320aa819f68fa980389cef7ec6: max_seq_len
  default 512 (longer examples truncated; a batch is padded to its longest).
- [gb] torchtune/utils/memory.py @ 0fd885e372eda47da397cb1171b8b2ba73c8fb6e: the tutorials' era
  logged "GB" = bytes / 1e9.

The tutorials are older than some of these config versions; where a version may differ
from the one the tutorial ran, the row says what was assumed.
"""

from __future__ import annotations

GIB, GB = 2**30, 10**9

LLAMA32_3B = ["model.name=catalog:llama-3.2-3b", "train.batch_size=2"]
PACKED = ["task.max_length=4096", "task.packing=true"]  # packed: every row is 4096 tokens
CHUNKED = ["task.loss_chunk_tokens=1024"]  # torchtune: 8 chunks of 8192 positions
AC = ["model.gradient_checkpointing=true"]
OFFLOAD = ["train.activation_offloading=true"]
FULL = ["strategy.name=full", "train.optimizer=adamw_fused"]
LORA3B = ["strategy.r=64", "strategy.alpha=128",
          "strategy.target_modules=[q_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"]
LLAMA2_7B = ["model.name=catalog:llama-2-7b", "train.batch_size=2", "task.max_length=512", *AC]
EAGER = "reproduced, eager"  # torchtune ran torch.compile; the estimate traces the eager step




def row(name, published, unit, measure, overrides, settings, sources, status="reproduced"):
    """status: "reproduced" (peftkit runs the published settings), EAGER (the same, but the
    published run was compiled: peftkit has train.compile, its estimate does not model the
    fusion), or "nearest: why" (the closest peftkit configuration, differing as it says)."""
    return {"row": name, "published": published, "unit": unit, "measure": measure, "overrides": overrides,
            "settings": settings, "sources": sources, "status": status}


ROWS = [
    row("3B full: baseline", 25.5, "GiB", "active", [*LLAMA32_3B, "task.max_length=512", *FULL],
        "full, bf16 weights/grads/AdamW state, no AC, transformers' cross-entropy, alpaca unpacked: the step's peak "
        "is the end of backward, flat at 25.4 GiB for padded batches up to ~770 tokens a row (512 traced; "
        "2 x 896: 26.7, 2 x 1024: 27.9 GiB); "
        "AdamW fused (foreach would add a copy of every parameter: 29.9 GiB, above the published peak)",
        "readme, full3b, mem"),
    row("3B full: + packed", 60.0, "GiB", "active", [*LLAMA32_3B, *PACKED, *FULL],
        "as above, packed to 2 x 4096", "readme, full3b"),
    row("3B full: + compile", 51.0, "GiB", "active", [*LLAMA32_3B, *PACKED, *FULL],
        "as above", "readme", EAGER),
    row("3B full: + chunked cross-entropy", 42.9, "GiB", "active", [*LLAMA32_3B, *PACKED, *FULL, *CHUNKED],
        "+ task.loss_chunk_tokens=1024", "readme", EAGER),
    row("3B full: + activation checkpointing", 24.9, "GiB", "active", [*LLAMA32_3B, *PACKED, *FULL, *CHUNKED, *AC],
        "+ model.gradient_checkpointing", "readme", EAGER),
    row("3B full: + optimizer step in backward", 23.1, "GiB", "active",
        [*LLAMA32_3B, *PACKED, *FULL, *CHUNKED, *AC], "the row above", "readme",
        "nearest: peftkit has no optimizer-in-backward (it would drop gradient clipping, the NaN/Inf step skip "
        "and gradient accumulation, which need the whole gradient before the step)"),
    row("3B full: + activation offloading", 21.8, "GiB", "active",
        [*LLAMA32_3B, *PACKED, *FULL, *CHUNKED, *AC, *OFFLOAD],
        "+ train.activation_offloading (no optimizer-in-backward: the peak stays at the end of backward, "
        "where nothing is offloaded)", "readme", "nearest: no optimizer-in-backward in peftkit"),
    row("3B full: + 8-bit AdamW", 17.6, "GiB", "active",
        [*LLAMA32_3B, *PACKED, "strategy.name=full", "train.optimizer=adamw8bit", *CHUNKED, *AC, *OFFLOAD],
        "+ train.optimizer=adamw8bit (bitsandbytes AdamW8bit)", "readme", "nearest: no optimizer-in-backward in peftkit"),
    row("3B LoRA", 8.5, "GiB", "active", [*LLAMA32_3B, *PACKED, "strategy.name=lora", *LORA3B, *CHUNKED, *AC, *OFFLOAD],
        "LoRA r64 a128 on q, v, o + MLP (fp32 adapters: peft's default), packed 2 x 4096, chunked CE, AC, "
        "activation offloading, AdamW fused", "readme, lora3b", EAGER),
    row("3B QLoRA", 4.6, "GiB", "active",
        [*LLAMA32_3B, *PACKED, "strategy.name=qlora", *LORA3B, *CHUNKED, *AC, *OFFLOAD,
         "strategy.upcast_unquantized=false"],
        "as LoRA over an nf4 backbone; norms and embeddings stay bf16 (strategy.upcast_unquantized=false, as "
        "torchtune); peftkit also quantizes k_proj, which torchtune leaves bf16", "readme, qlora3b", EAGER),
    row("3B QLoRA, peft's k-bit preparation", 4.6, "GiB", "active",
        [*LLAMA32_3B, *PACKED, "strategy.name=qlora", *LORA3B, *CHUNKED, *AC, *OFFLOAD],
        "as above with peftkit's default upcast_unquantized=true (embeddings and norms fp32)", "readme, qlora3b",
        "nearest: fp32 embeddings and norms where torchtune keeps bf16"),
    row("7B LoRA q,v r8", 15.57, "GB", "reserved",
        [*LLAMA2_7B, "strategy.name=lora", "strategy.r=8", "strategy.alpha=16", "strategy.target_modules=[q_proj,v_proj]"],
        "bf16, AC, batch 2, alpaca-cleaned truncated to 512 tokens (the longest batch: 2 x 512), transformers' "
        "cross-entropy, AdamW; published = peak reserved, estimated = peak allocated",
        "lora-tut, qlora-tut, lora7b, alpaca, gb"),
    row("7B LoRA all layers r64", 17.04, "GB", "reserved",
        [*LLAMA2_7B, "strategy.name=lora", "strategy.r=64", "strategy.alpha=128",
         "strategy.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head]"],
        "as above, LoRA r64 a128 on every linear and the output projection", "lora-tut, lora7b, alpaca, gb"),
    row("7B QLoRA", 9.29, "GB", "reserved",
        [*LLAMA2_7B, "strategy.name=qlora", "strategy.r=8", "strategy.alpha=16", "strategy.upcast_unquantized=false",
         "strategy.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"],
        "nf4, LoRA r8 a16 on q, k, v, o + MLP, bf16 norms/embeddings, as the LoRA rows otherwise",
        "qlora-tut, qlora7b, alpaca, gb",
        "nearest: the published figure is peak *reserved* and the tutorial shows 9.13 GB reserved right after "
        "model init, before any step (torchtune builds bf16 weights on the GPU and quantizes them there); "
        "without an empty_cache that is a floor for the training figure, so it measures the allocator's "
        "history, not the step"),
]
