"""Training-memory estimate before any weight is loaded: one whole step on fake tensors.

The model is built from its config alone on the meta device, the strategy is applied to it
exactly as in training, then every parameter/buffer becomes a *fake* tensor
(``FakeTensorMode``: shapes and dtypes, no storage). The optimizer takes one warm-up step
(its state exists, as after the trainer's first step) and then one whole training step runs
- forward under the recipe's autocast, backward, optimizer step, zero_grad - under the same
live-storage tracker that measures real steps (``memory.LiveMemory``). So the estimate is a
peak, temporaries included, by the same rule as the measurement.

Stand-ins where the real kernels cannot run on fake tensors (see ``fakes.py``):
4-/8-bit linears hold packed weights plus bitsandbytes' quant state and dequantize a
compute-dtype copy of the weight per call (as bitsandbytes does); ``device="cuda"`` swaps
attention for a flash/memory-efficient stand-in (O(seq) statistics, no score matrix),
rounds every block to 512 B and adds a stated CUDA-context allowance.
"""

from __future__ import annotations

import time

import torch

from . import backbone, memory, strategies, tasks
from .errors import UserError


def _fake_batch(auto_name: str, batch: int, seq: int, packed: bool) -> dict:
    if packed:  # padding-free: one row of batch x seq tokens, positions restart per sequence
        ids = torch.zeros(1, batch * seq, dtype=torch.long)
        return {"input_ids": ids, "labels": ids.clone(),
                "position_ids": torch.arange(seq).repeat(batch).unsqueeze(0)}
    ids = torch.zeros(batch, seq, dtype=torch.long)
    labels = torch.zeros(batch, dtype=torch.long) if "SequenceClassification" in auto_name else ids.clone()
    return {"input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.long), "labels": labels}


def _config(recipe, task, tok):
    from transformers import AutoConfig

    from .catalog import resolve_config

    mc = recipe.model
    try:
        config = resolve_config(mc.name)
        if config is None:
            config = AutoConfig.from_pretrained(backbone.resolve(mc.name), revision=mc.revision,
                                                trust_remote_code=mc.trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"model.name: cannot read the config of '{mc.name}': {str(e).splitlines()[0]}") from None
    for k, v in task.model_kwargs().items():
        setattr(config, k, v)
    pad = getattr(tok, "pad_token_id", None) if tok is not None else None
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = pad if pad is not None else 0
    return config


def fake_model(recipe, task, tok, device: str):
    """(model on fake tensors, its AutoModel class name, [quantized linears])."""
    from . import fakes

    mc = recipe.model
    config = _config(recipe, task, tok)
    dtype, cdt = backbone.DTYPES[mc.dtype], backbone.DTYPES[mc.compute_dtype]
    quant = mc.quantization or "none"
    attn = backbone.attention_impl(mc.attn_implementation, dtype if quant == "none" else cdt)
    if device == "cuda" and attn in ("sdpa", "flash_attention_2"):
        attn = fakes.flash_attention_name()
    auto = task.auto_class()
    # Built and adapted on the meta device (peft moves modules, which fake tensors refuse).
    with torch.device("meta"):
        model = auto.from_config(config, dtype=dtype, attn_implementation=attn,
                                 trust_remote_code=mc.trust_remote_code)
        qlinears = fakes.quantized_linears(model, list(task.head_names)) if quant != "none" else []
        if mc.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = strategies.get(recipe.strategy).apply(model, task.head(model))
    model.train()
    return model, auto.__name__, qlinears


def _to_fake(model) -> None:
    """Replace meta parameters/buffers by fake CPU tensors in place (ties kept)."""
    done: dict[int, torch.Tensor] = {}
    for mod in model.modules():
        for store, is_param in ((mod._parameters, True), (mod._buffers, False)):
            for name, t in list(store.items()):
                if t is None:
                    continue
                if id(t) not in done:
                    new = torch.empty(t.shape, dtype=t.dtype, device="cpu")
                    done[id(t)] = torch.nn.Parameter(new, requires_grad=t.requires_grad) if is_param else new
                store[name] = done[id(t)]


def _warm_optimizer(model, tc):
    """The trainer's optimizer after one step: its state exists, gradients are None."""
    from .trainer import make_optimizer

    opt = make_optimizer(model, tc)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return opt


def _step(model, opt, batch: dict, micro: int, tc) -> None:
    amp = tc.precision in ("bf16", "fp16")
    for _ in range(micro):
        with torch.autocast("cpu", dtype=backbone.DTYPES[tc.precision], enabled=amp):
            loss = model(**batch).loss
        loss.backward()
        del loss
    if tc.max_grad_norm:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], tc.max_grad_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)


def estimate(recipe, batch_size: int | None = None, seq_len: int | None = None,
             seq_source: str | None = None, device: str | None = None, task=None, tokenizer=None) -> dict:
    """Peak memory of one training step of ``recipe``, predicted from config and shapes only."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from . import fakes

    t0 = time.perf_counter()
    mc, tc, target = recipe.model, recipe.train, device or "cpu"
    batch = batch_size or tc.batch_size
    seq = seq_len or recipe.task.max_length
    src = seq_source or ("given" if seq_len else "task.max_length (upper bound: every batch padded to it)")
    tok = tokenizer if tokenizer is not None else _tokenizer(mc)
    task = task or tasks.get(recipe.task, tok)
    model, auto_name, qlinears = fake_model(recipe, task, tok, target)
    with FakeTensorMode(allow_non_fake_inputs=True):
        _to_fake(model)
        fakes.quantize(qlinears, mc)
        trainable, total = strategies.count_params(model)
        opt = _warm_optimizer(model, tc)
        weights, optimizer = memory.weight_bytes(model), memory.optimizer_bytes(opt)
        tracker = memory.LiveMemory(round_to=fakes.BLOCK_ROUND if target == "cuda" else 1)
        handles = memory.track_state(tracker, model, opt)
        fb = _fake_batch(auto_name, batch, seq, tc.padding_free)
        with tracker:
            _step(model, opt, fb, min(tc.grad_accum, 2), tc)
        for h in handles:
            h.remove()
    peak = tracker.summary()
    out = {
        "method": "one whole training step on fake tensors (no weights loaded), live-storage tracker",
        "batch_size": batch, "seq_len": seq, "seq_source": src, "precision": tc.precision,
        "device": target, "optimizer": tc.optimizer,
        "params": {"total": total, "trainable": trainable},
        "weights": weights, "optimizer_state": optimizer,
        "at_peak": peak["at_peak"], "peak_bytes": peak["peak_bytes"], "total_bytes": peak["peak_bytes"],
    }
    out.update(fakes.allowances(target, opt, tracker))
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def _tokenizer(mc):
    """The recipe's tokenizer; None for catalogue/config-only models (vocab size from config)."""
    from .catalog import resolve_config

    if resolve_config(mc.name) is not None:
        return None
    try:
        return backbone.load_tokenizer(mc)
    except UserError:
        return None


def rel_error(est: float | None, ref: float | None) -> float | None:
    """(estimate - reference) / reference."""
    if est is None or not ref:
        return None
    return (est - ref) / ref


def render(est: dict, recipe=None) -> None:
    """The estimate as a terminal table: the peak and its split by category."""
    from rich.console import Console
    from rich.table import Table

    def mib(b):
        return f"{b / 2**20:,.1f} MiB"

    p = est["params"]
    title = (f"{recipe.strategy.name} on {recipe.model.name}: " if recipe is not None else "") + (
        f"batch {est['batch_size']} x seq {est['seq_len']}, {est['precision']}, target {est['device']}")
    t = Table(title=title)
    t.add_column("at the step's peak")
    t.add_column("bytes", justify="right")
    for k, v in est["at_peak"].items():
        t.add_row(k, mib(v))
    t.add_row("[bold]peak (allocated)[/bold]", f"[bold]{mib(est['peak_bytes'])}[/bold]")
    if "device_total_bytes" in est:
        t.add_row(f"+ {est['context_note']}", mib(est["context_bytes"]))
        t.add_row("[bold]device total[/bold]", f"[bold]{mib(est['device_total_bytes'])}[/bold]")
    c = Console()
    c.print(t)
    w = est["weights"]
    c.print("weights: " + ", ".join(f"{k} {mib(v)}" for k, v in w["by_type"].items())
            + f"; trainable {p['trainable']:,} / {p['total']:,} params")
    c.print(f"seq length: {est['seq_source']}; {est['method']}; {est['seconds']} s.")
