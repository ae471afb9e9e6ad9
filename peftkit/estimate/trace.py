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
rounds every block to 512 B and adds a stated CUDA-context allowance. Activation
offloading runs ``offload.py``'s own hooks with ``simulated=True``: a tensor sent to the host
leaves the traced device memory and is allocated anew when backward unpacks it.
"""

from __future__ import annotations

import copy
import time
import types
from contextlib import nullcontext

import torch

from peftkit.model import backbone
from peftkit.estimate import fakes
from peftkit import hardware, strategies, tasks
from peftkit.step import kernels, memory, offload
from peftkit.errors import UserError


LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
EXACT_LAYERS = 4  # deeper models: traced at 2 and 3 (or 2 and 4) layers, extrapolated linearly


def _fake_batch(auto_name: str, batch: int, seq: int, packed: bool) -> dict:
    if packed:  # padding-free: one row of batch x seq tokens, positions restart per sequence
        ids = torch.zeros(1, batch * seq, dtype=torch.long)
        return {"input_ids": ids, "labels": ids.clone(),
                "position_ids": torch.arange(seq).repeat(batch).unsqueeze(0)}
    ids = torch.zeros(batch, seq, dtype=torch.long)
    labels = torch.zeros(batch, dtype=torch.long) if "SequenceClassification" in auto_name else ids.clone()
    return {"input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.long), "labels": labels}


def _config(mc):
    from transformers import AutoConfig

    from peftkit.estimate.catalog import resolve_config

    try:
        config = resolve_config(mc.name)
        if config is None:
            config = AutoConfig.from_pretrained(backbone.resolve(mc.name), revision=mc.revision,
                                                trust_remote_code=mc.trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"model.name: cannot read the config of '{mc.name}': {str(e).splitlines()[0]}") from None
    return config


def _tokens(config, tok):
    """The tokenizer, or for config-only models a stand-in with the config's special ids."""
    if tok is not None:
        return tok
    eos = config.eos_token_id[0] if isinstance(config.eos_token_id, list) else config.eos_token_id
    return types.SimpleNamespace(eos_token_id=eos, pad_token_id=getattr(config, "pad_token_id", None) or eos or 0,
                                 sep_token_id=getattr(config, "sep_token_id", None), chat_template=None)


def fake_model(recipe, config, task, device: str):
    """(model on meta tensors, its AutoModel class name, [quantized linears])."""
    mc = recipe.model
    for k, v in task.model_kwargs().items():
        setattr(config, k, v)
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = task.tokenizer.pad_token_id
    dtype, cdt = backbone.DTYPES[mc.dtype], backbone.DTYPES[mc.compute_dtype]
    quant = mc.quantization or "none"
    attn = backbone.attention_impl(mc.attn_implementation, dtype if quant == "none" else cdt)
    if device == "cuda" and (attn == "sdpa" or attn in kernels.VARLEN):
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
        if (frozen := hardware.frozen_dtype(recipe)) is not None:  # as the trainer stores them
            strategies.cast_frozen(model, frozen)
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
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from peftkit.step.optim import make_optimizer

    with unset_fake_temporarily():  # bitsandbytes builds its quantization maps from real values
        opt = make_optimizer(model, tc)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return opt


def _step(model, opt, batch: dict, micro: int, tc, loss_fn) -> None:
    amp = tc.precision in ("bf16", "fp16")
    for _ in range(micro):
        with (torch.autocast("cpu", dtype=backbone.DTYPES[tc.precision], enabled=amp),
              offload.hooks(simulated=True) if tc.activation_offloading else nullcontext()):
            loss = loss_fn(model, batch)
        loss.backward()
        del loss
    if tc.max_grad_norm:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], tc.max_grad_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)


def estimate(recipe, batch_size: int | None = None, seq_len: int | None = None,
             seq_source: str | None = None, device: str | None = None, task=None, tokenizer=None) -> dict:
    """Peak memory of one training step of ``recipe``, predicted from config and shapes only."""
    return Estimator(recipe, device, task, tokenizer).at(batch_size, seq_len, seq_source)


class Estimator:
    """Fake models built once per recipe; ``at(batch, seq)`` traces one step at that shape.

    Decoder/encoder layers are identical, so every byte at a phase's peak (forward, backward,
    optimizer step) is linear in the layer count: a deep model is traced at two small layer
    counts, each phase extrapolated, and the step's peak is the largest (exact for a repeated
    block; tests compare it with the full trace).
    """

    def __init__(self, recipe, device: str | None = None, task=None, tokenizer=None):
        recipe = hardware.pinned(recipe)  # precision/compute_dtype auto: what this machine runs
        self.recipe, self.target = recipe, device or "cpu"
        if recipe.train.activation_offloading and self.target != "cuda":
            raise UserError("train.activation_offloading: a CUDA feature (saved activations move from GPU to host "
                            "memory); estimate it with --device cuda")
        config = _config(recipe.model)
        self.config = config
        self.task = task or tasks.get(recipe.task, _tokens(config, tokenizer if tokenizer is not None
                                                           else _tokenizer(recipe.model)))
        key = next((k for k in LAYER_KEYS if isinstance(getattr(config, k, None), int)), None)
        n = getattr(config, key) if key else 0
        if n <= EXACT_LAYERS or getattr(config, "is_encoder_decoder", False):
            self.runs, self.f, self.how = [_FakeRun(recipe, config, self.task, self.target)], None, "every layer traced"
        else:
            period = 2 if len(set(getattr(config, "layer_types", None) or [0])) > 1 else 1  # e.g. Gemma-2
            lo, hi = (2, 3) if period == 1 else (2, 4)
            self.runs = [_FakeRun(recipe, _with_layers(config, key, k), self.task, self.target) for k in (lo, hi)]
            self.f, self.how = (n - lo) / (hi - lo), f"{n} layers extrapolated from traces of {lo} and {hi}"

    def at(self, batch_size: int | None = None, seq_len: int | None = None, seq_source: str | None = None) -> dict:
        t0 = time.perf_counter()
        tc = self.recipe.train
        batch, seq = batch_size or tc.batch_size, seq_len or self.recipe.task.max_length
        src = seq_source or ("given" if seq_len else "task.max_length (upper bound: every batch padded to it)")
        traces = [r.trace(batch, seq) for r in self.runs]
        out = traces[0] if self.f is None else _extrapolate(*traces, self.f)
        # Each phase's peak is linear in the depth, the step's peak is their max: a shallow trace can
        # peak in backward while the deep model peaks in the optimizer step (foreach AdamW, full).
        for p in out["phases"].values():  # paged state: cudaMallocManaged, outside the allocator's count
            p["peak_bytes"] -= out.get("paged_optimizer_bytes", 0)
        top = max(out["phases"].values(), key=lambda p: p["peak_bytes"])
        peak, out["at_peak"] = top["peak_bytes"], dict(top["at_peak"])
        out.update({
            "method": "one whole training step on fake tensors (no weights loaded), live-storage tracker; " + self.how,
            "batch_size": batch, "seq_len": seq, "seq_source": src, "precision": tc.precision,
            "device": self.target, "optimizer": tc.optimizer, "peak_bytes": peak, "total_bytes": peak,
        })
        out.update(fakes.allowances(self.target, peak))
        out["seconds"] = round(time.perf_counter() - t0, 2)
        return out


def _with_layers(config, key: str, n: int):
    c = copy.deepcopy(config)
    setattr(c, key, n)
    if getattr(c, "layer_types", None):
        c.layer_types = c.layer_types[:n]
    return c


def _extrapolate(a, b, f: float):
    """a + f * (b - a) for every number (nested dicts kept)."""
    if isinstance(a, dict):
        return {k: _extrapolate(a[k], b.get(k, a[k]), f) for k in a}
    if isinstance(a, (int, float)) and not isinstance(a, bool):
        return int(round(a + f * (b - a)))
    return a


class _FakeRun:
    """One fake model with its warmed-up optimizer; ``trace`` runs one tracked step (reusable)."""

    def __init__(self, recipe, config, task, target: str):
        from torch._subclasses.fake_tensor import FakeTensorMode

        self.tc, self.target, self.task = recipe.train, target, task
        with kernels.stock():  # Liger's RoPE (module-level, Triton) cannot run on fake CPU tensors
            self.model, self.auto_name, qlinears = fake_model(recipe, copy.deepcopy(config), task, target)
        self.fused_loss = _fused_loss(recipe, self.model, target)
        self.padding_free = kernels.padding_free(recipe, _attn_chosen(recipe), target)[0]
        self.mode = FakeTensorMode(allow_non_fake_inputs=True)
        with self.mode:
            _to_fake(self.model)
            fakes.quantize(qlinears, recipe.model)
            trainable, total = strategies.count_params(self.model)
            self.opt = _warm_optimizer(self.model, self.tc)
            self.static = {"params": {"total": total, "trainable": trainable},
                           "weights": memory.weight_bytes(self.model),
                           "optimizer_state": memory.optimizer_bytes(self.opt)}
            if target == "cuda":
                self.static["paged_optimizer_bytes"] = fakes.paged_bytes(self.opt)

    def trace(self, batch: int, seq: int) -> dict:
        with self.mode:
            tracker = memory.LiveMemory(round_to=fakes.BLOCK_ROUND if self.target == "cuda" else 1)
            handles = memory.track_state(tracker, self.model, self.opt)
            fb = _fake_batch(self.auto_name, batch, seq, self.padding_free)
            try:
                with tracker, kernels.stock():
                    _step(self.model, self.opt, fb, min(self.tc.grad_accum, 2), self.tc, self._loss(batch * seq))
            finally:
                for h in handles:
                    h.remove()
        peak = tracker.summary()
        return {**copy.deepcopy(self.static), "at_peak": peak["at_peak"], "peak_bytes": peak["peak_bytes"],
                "phases": peak["phases"]}

    def _loss(self, tokens: int):
        """The training loss as it runs: Liger's fused linear cross-entropy never builds the logits;
        its stand-in is the chunked loss (chunked_loss.py) at Liger's chunk size: hidden states
        kept, one chunk's logits at a time. Not modelled: Liger's input-gradient buffer
        (tokens x hidden, allocated in forward) and, when the output layer trains, its weight
        gradient allocated in forward rather than in backward."""
        if not self.fused_loss:
            return self.task.train_loss
        from peftkit.step.chunked_loss import causal_lm_loss

        c = self.model.config
        chunk = kernels.fused_loss_chunk(tokens, c.hidden_size, c.vocab_size)
        return lambda model, batch: causal_lm_loss(model, batch, chunk)


def _attn_chosen(recipe) -> str:
    """The attention implementation the run picks here (the trace itself runs a stand-in)."""
    mc = recipe.model
    dtype = backbone.DTYPES[mc.dtype if (mc.quantization or "none") == "none" else mc.compute_dtype]
    return backbone.attention_impl(mc.attn_implementation, dtype)


def _fused_loss(recipe, model, target: str) -> bool:
    """Whether the run's loss is Liger's fused one (decided as model.backbone.load decides it)."""
    if getattr(recipe.task, "loss_chunk_tokens", None):  # the chunked loss runs instead, traced as is
        return False
    try:
        use, _ = kernels.liger_choice(recipe.model.kernels, getattr(model.config, "model_type", None),
                                      kernels.is_causal_lm(_inner(model)), target)
    except UserError:
        return False  # the run itself refuses this recipe; the estimate shows the stock loss
    return use


def _inner(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _tokenizer(mc):
    """The recipe's tokenizer; None for catalogue/config-only models (vocab size from config)."""
    from peftkit.estimate.catalog import resolve_config

    if resolve_config(mc.name) is not None:
        return None
    try:
        return backbone.load_tokenizer(mc)
    except UserError:
        return None


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
