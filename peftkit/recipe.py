"""Typed, frozen recipes: YAML -> Recipe, dotted command-line overrides, strict errors.

A recipe has five sections: ``model``, ``task`` (selected by ``task.kind``), ``strategy``
(selected by ``strategy.name``), ``train`` and ``output``. Unknown keys are errors naming
the full key path and the keys allowed there.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import Field, ValidationError, model_validator

from peftkit import strategies, tasks
from peftkit.config import Section
from peftkit.errors import RecipeError


class ModelConfig(Section):
    name: str = "builtin:minilm"  # builtin:NAME, a local directory, or a hub id
    revision: str | None = None
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"  # storage dtype of the (non-quantized) weights
    quantization: Literal["none", "4bit", "8bit"] | None = None  # None: what the strategy needs
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # 4-bit layers; auto: train.precision's (hardware.py)
    # auto: flash_attention_4 on Hopper/Blackwell with flash-attn-4, flash_attention_2 with flash-attn, else sdpa
    attn_implementation: Literal["auto", "flash_attention_4", "flash_attention_2", "sdpa", "eager"] = "auto"
    # fused Triton kernels (peftkit/step/kernels.py); auto: liger for CUDA causal LMs it covers, else none
    kernels: Literal["auto", "none", "liger"] = "auto"
    # blocks: torch.compile on each decoder block (one graph reused: short compile); none: eager
    compile: Literal["none", "blocks"] = "none"
    gradient_checkpointing: bool = False
    # auto: under bf16/fp16 autocast, frozen linear weights are stored once in that dtype
    # (autocast's per-step re-cast becomes a no-op; half their memory); keep: as loaded
    frozen_dtype: Literal["auto", "keep"] = "auto"
    trust_remote_code: bool = False


class TrainConfig(Section):
    seed: int = 0
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=0)  # overrides epochs when set; 0 = evaluate the untrained model
    batch_size: int = Field(16, ge=1)  # GLOBAL: summed over processes (each gets batch_size / N)
    grad_accum: int = Field(1, ge=1)
    # set: batch_size is the global batch of ONE optimizer step, trained in micro-batches of this size
    # per process with accumulation; auto: the largest power of two the device fits, by the
    # estimate (estimate/fit.py choose_micro_batch), so one recipe trains the same on 24 and 80 GiB
    micro_batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] | None = None
    lr: float = Field(5e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    max_grad_norm: float | None = Field(1.0, gt=0)
    # autocast for the forward/backward; auto: bf16 where native, fp16 on CUDA without, else fp32 (hardware.py)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # fused: one kernel per parameter; on CPU ~3.7x faster per step than foreach (MiniLM, full).
    # adamw8bit / paged_adamw8bit: bitsandbytes' blockwise 8-bit state (paged: CUDA unified memory).
    optimizer: Literal["adamw", "adamw_foreach", "adamw_fused", "adamw8bit", "paged_adamw8bit"] = "adamw_fused"
    group_by_length: bool = True
    eval_every: int | None = Field(None, ge=1)  # steps; None = only at the end
    eval_split: Literal["validation", "test"] = "test"  # split reported in metrics.eval
    log_every: int = Field(10, ge=1)
    # also write every step's loss, real-token count and gradient norm to log.jsonl (records with
    # step_loss / step_tokens / grad_norm); they are read from the device with the log_every
    # records, so this adds no per-step device sync
    log_step_values: bool = False
    num_workers: int = Field(0, ge=0)
    compile: bool = False
    # round each training batch's padded length up to a multiple (peftkit/bucket.py): fewer
    # shapes for torch.compile to specialise on; None = 16 when compile is on, else off
    pad_to_multiple_of: int | None = Field(None, ge=1)
    padding_free: bool = False  # causal LM: one row per batch, no padding (fastest with flash_attention_2)
    # CUDA: tensors saved for backward wait in host memory (offload.py); with gradient checkpointing, the layer inputs
    activation_offloading: bool = False
    progress: bool = True
    checkpoint_every: int | None = Field(200, ge=1)  # steps; None = only on SIGINT/SIGTERM
    keep_checkpoints: int = Field(2, ge=1)
    nonfinite: Literal["skip", "stop"] = "skip"  # NaN/Inf loss or gradients
    max_nonfinite_skips: int = Field(10, ge=0)
    # search rungs: halt after this fraction of the budget (schedule of the whole budget), with a
    # checkpoint and a validation eval; the rest of the budget resumes that checkpoint.
    stop_at: float | None = Field(None, gt=0, le=1)

    def stop_step(self, total: int) -> int:
        return total if self.stop_at is None else max(1, min(total, round(self.stop_at * total)))


class OutputConfig(Section):
    dir: str = "runs/{task}-{strategy}"
    save_weights: bool = True
    # Experiment trackers (accelerate's names); None: [tensorboard] when it is installed, else [].
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive",
                            "swanlab", "trackio"]] | None = None

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data):
        if isinstance(data, dict) and "tensorboard" in data:
            raise ValueError("output.tensorboard was replaced by output.report_to "
                             "(e.g. report_to: [tensorboard], or [] for no tracker)")
        return data


def _union(configs: list[type], tag: str):
    if len(configs) == 1:
        return configs[0]
    return Annotated[Union[tuple(configs)], Field(discriminator=tag)]  # noqa: UP007


StrategyUnion = _union([s.Config for s in strategies.REGISTRY.values()], "name")
TaskUnion = _union([t.Config for t in tasks.REGISTRY.values()], "kind")


class Recipe(Section):
    name: str | None = None
    model: ModelConfig = ModelConfig()
    task: TaskUnion = Field(default_factory=lambda: tasks.REGISTRY["classification"].Config())  # type: ignore[valid-type]
    strategy: StrategyUnion = Field(default_factory=lambda: strategies.REGISTRY["lora"].Config())  # type: ignore[valid-type]
    train: TrainConfig = TrainConfig()
    output: OutputConfig = OutputConfig()

    @model_validator(mode="before")
    @classmethod
    def _strategy_defaults(cls, data: Any):
        # qlora implies a 4-bit backbone unless the recipe says otherwise.
        if isinstance(data, dict):
            sname = (data.get("strategy") or {}).get("name", "lora")
            scls = strategies.REGISTRY.get(sname)
            model = dict(data.get("model") or {})
            if model.get("quantization") is None:
                model["quantization"] = scls.default_quantization if scls else "none"
                data = {**data, "model": model}
        return data

    @model_validator(mode="after")
    def _compatible(self):
        problems = strategies.get(self.strategy).check(self) + tasks.REGISTRY[self.task.kind].check(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _micro_batch(self):
        t = self.train
        m = t.micro_batch_size
        if m is not None and t.grad_accum != 1:
            raise ValueError("train.grad_accum: leave it at 1 when train.micro_batch_size is set (the "
                             "accumulation is train.batch_size / micro_batch_size)")
        if isinstance(m, int) and t.batch_size % m:
            raise ValueError(f"train.micro_batch_size: {m} does not divide train.batch_size {t.batch_size}")
        return self

    # -- identity -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def hash(self) -> str:
        """Stable hash of the resolved recipe, without output settings (where/how often it is written)."""
        d = self.to_dict()
        d.pop("output", None)
        for section, keys in _NOT_HASHED.items():
            for k in keys:
                d[section].pop(k, None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def run_dir(self) -> str:
        return self.output.dir.format(task=self.task.kind, strategy=self.strategy.name, name=self.name or "run")


# Settings that change where or how often things are written, never the trained weights.
_NOT_HASHED = {"train": ("checkpoint_every", "keep_checkpoints", "progress", "stop_at")}


# -- loading ------------------------------------------------------------------------------
class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, except that a key given twice in one mapping is an error: YAML keeps the
    last one silently, so a recipe's first ``lr:`` would be ignored without a word."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.setdefault(key, line)
            except TypeError:  # an unhashable key: let SafeLoader report it as usual
                continue
            if first != line:
                raise RecipeError(f"line {line}: duplicate key '{key}' (first given on line {first})")
        return super().construct_mapping(node, deep)


def safe_load_unique(text: str):
    """``yaml.safe_load`` that refuses duplicate keys (RecipeError naming the key and both lines)."""
    loader = _UniqueKeyLoader(text)  # what yaml.safe_load does, with the duplicate check
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{p}: recipe file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"{p}: cannot read recipe ({e.__class__.__name__}: {e})") from None
    try:
        data = safe_load_unique(text)
    except RecipeError as e:
        raise RecipeError(f"{p}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise RecipeError(f"{p}:{where} invalid YAML: {getattr(e, 'problem', e)}") from None
    if data is None or data == {}:
        # An empty file would otherwise train the schema's defaults: almost surely a mistake.
        raise RecipeError(f"{p}: the recipe file is empty")
    if not isinstance(data, dict):
        raise RecipeError(f"{p}: a recipe must be a mapping of sections, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise RecipeError(f"override '{text}': expected KEY=VALUE, e.g. train.lr=3e-4")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise RecipeError(f"override '{text}': empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return parts, value


# Keys that select a section's schema: changing them starts from that schema's fields.
_SELECTORS = {("strategy", "name"): strategies.REGISTRY, ("task", "kind"): tasks.REGISTRY}


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = copy.deepcopy(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise RecipeError(f"override '{text}': '{'.'.join(parts[: i + 1])}' is not a section")
            node = nxt
        sel = _SELECTORS.get(tuple(parts))
        if sel is not None and node.get(parts[-1]) != value and value in sel:
            # Switching strategy/kind: keep only the keys the new schema knows.
            allowed = sel[value].Config.model_fields
            for k in [k for k in node if k not in allowed]:
                del node[k]
        node[parts[-1]] = value
    return data


def _path_and_model(loc: tuple) -> tuple[str, type | None]:
    """Human key path from a pydantic error location (tags of unions removed)."""
    cls: Any = Recipe
    path: list[str] = []
    i = 0
    while i < len(loc):
        part = loc[i]
        if cls is not None and isinstance(part, str) and part in getattr(cls, "model_fields", {}):
            path.append(part)
            field = cls.model_fields[part]
            reg = {"strategy": strategies.REGISTRY, "task": tasks.REGISTRY}.get(part) if cls is Recipe else None
            if reg is not None and i + 1 < len(loc) and loc[i + 1] in reg:
                nxt = reg[loc[i + 1]].Config  # a discriminated union puts the tag in loc
                i += 1
            else:
                ann = field.annotation
                nxt = ann if isinstance(ann, type) and issubclass(ann, Section) else None
            cls = nxt
        else:
            path.append(str(part))
            cls = None if not isinstance(part, str) or cls is None else cls
        i += 1
    return ".".join(path), cls


def _format(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        if e["type"] == "extra_forbidden":
            path, _ = _path_and_model(loc)
            _, parent = _path_and_model(loc[:-1])
            allowed = ", ".join(parent.model_fields) if parent is not None else "?"
            lines.append(f"unknown key '{path}' (allowed here: {allowed})")
        elif e["type"] == "union_tag_invalid":
            path, _ = _path_and_model(loc)
            reg = strategies.REGISTRY if path.startswith("strategy") else tasks.REGISTRY
            key = "strategy.name" if path.startswith("strategy") else "task.kind"
            got = e.get("ctx", {}).get("tag")
            lines.append(f"{key}: unknown value '{got}' (known: {', '.join(reg)})")
        elif e["type"] == "value_error" and not loc:
            lines.append(e["msg"].removeprefix("Value error, "))
        else:
            path, _ = _path_and_model(loc)
            got = e.get("input")
            got_s = f" (got {got!r})" if not isinstance(got, dict) else ""
            lines.append(f"{path or 'recipe'}: {e['msg']}{got_s}")
    return f"{source}: " + "; ".join(lines)


def from_dict(data: dict, source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(_format(e, source)) from None


def load(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    data = apply_overrides(read_yaml(path), overrides or [])
    return from_dict(data, str(path))


def dump_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
