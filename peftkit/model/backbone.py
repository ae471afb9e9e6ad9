"""Load a backbone (builtin, local directory or hub id) with dtype, quantization and attention."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from peftkit.assets import cache_dir, is_builtin, locate
from peftkit.errors import UserError
from peftkit.io import atomic_dir

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    info: dict = field(default_factory=dict)


def _smollm2_dir() -> Path:
    """SmolLM2 from its GGUF, converted once to a safetensors directory in the user cache.

    Its weights are dequantized from Q4_1: fine for tests and demos, not a full-quality model.
    """
    gguf = locate("builtin:smollm2")
    dest = cache_dir() / "smollm2-135m-instruct"
    if (dest / "config.json").exists():
        return dest
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logging.getLogger("peftkit").info("converting %s once to %s (~20 s)", gguf.name, dest)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # The weights are already dequantized to fp32; without this transformers refuses to save.
    model.hf_quantizer = None
    model.is_quantized = False
    with atomic_dir(dest, keep_existing=True) as tmp:  # a half-converted copy is never visible
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return dest


def resolve(name: str) -> str:
    """A path or hub id that from_pretrained understands."""
    if is_builtin(name):
        key = name.removeprefix("builtin:")
        if key == "minilm":
            return str(locate(name).parent)
        if key == "smollm2":
            return str(_smollm2_dir())
        locate(name)  # raises the one-line error for unknown names
        raise UserError(f"model.name: '{name}' is a data set, not a model")
    p = Path(name).expanduser()
    if p.exists():
        if not (p / "config.json").exists():
            raise UserError(f"model.name: directory {p} has no config.json")
        return str(p)
    if name.startswith((".", "/", "~")):
        raise UserError(f"model.name: directory {name} not found")
    return name  # a hub id: needs a network (or a populated HF cache)


# What each FlashAttention implementation needs: transformers' name -> (pip distribution, min CUDA capability).
# flash-attn 2 and flash-attn-4 both install the ``flash_attn`` module (FA2 even ships a ``cute`` folder),
# so availability is decided by the installed distribution's name, as transformers itself does.
FLASH = {"flash_attention_4": ("flash-attn-4", 9), "flash_attention_2": ("flash-attn", 8)}


def _installed(dist: str) -> bool:
    import importlib.metadata as md

    return dist in {d.replace("_", "-").lower() for d in md.packages_distributions().get("flash_attn", [])}


def _registered(name: str) -> bool:
    """transformers knows ``name`` (flash_attention_4 arrived in 5.x; older releases lack it)."""
    from transformers.modeling_utils import AttentionInterface

    return name in AttentionInterface._global_mapping


def flash_missing(name: str) -> str | None:
    """Why FlashAttention ``name`` cannot run here (None: it can)."""
    dist, cc = FLASH[name]
    if not torch.cuda.is_available():
        return "it needs a CUDA GPU and none is visible"
    if torch.cuda.get_device_capability()[0] < cc:
        return f"it needs CUDA compute capability >= {cc}.0, this GPU has {'.'.join(map(str, torch.cuda.get_device_capability()))}"
    if importlib.util.find_spec("flash_attn") is None or not _installed(dist):
        return f"the '{dist}' package is not installed (pip install 'peftkit[flash]' or pip install {dist})"
    if not _registered(name):
        import transformers

        return f"transformers {transformers.__version__} does not know '{name}'; upgrade transformers"
    return None


def attention_choice(requested: str, dtype: torch.dtype) -> tuple[str, str]:
    """(implementation, why). auto: FA4 on Hopper/Blackwell, else FA2, else SDPA (half dtypes only:
    the flash kernels have no fp32 path)."""
    if requested != "auto":
        return requested, "model.attn_implementation"
    if dtype not in (torch.float16, torch.bfloat16):
        return "sdpa", f"auto: {str(dtype).removeprefix('torch.')} weights (FlashAttention needs bf16/fp16)"
    tried = []
    for name in FLASH:
        why = flash_missing(name)
        if why is None:
            return name, f"auto: {FLASH[name][0]} installed, CUDA capability {'.'.join(map(str, torch.cuda.get_device_capability()))}"
        tried.append(f"not {name}: {why}")
    return "sdpa", "auto: " + "; ".join(tried)


def attention_impl(requested: str, dtype: torch.dtype) -> str:
    return attention_choice(requested, dtype)[0]


def check_attention(requested: str) -> None:
    """An explicitly requested FlashAttention that cannot run: one line naming the key and the package."""
    if requested in FLASH and (why := flash_missing(requested)) is not None:
        dist, cc = FLASH[requested]
        raise UserError(f"model.attn_implementation: {requested} needs the '{dist}' package (pip install {dist}) "
                        f"and a CUDA GPU of compute capability >= {cc}.0; here {why}")


def quantization_config(mc, skip: list[str]):
    if mc.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if mc.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip or None)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=mc.quant_type,
        bnb_4bit_use_double_quant=mc.double_quant,
        bnb_4bit_compute_dtype=DTYPES[mc.compute_dtype],
        **_fsdp_quant_storage(mc),
        # The new task head stays out of quantization: it must train in full precision.
        llm_int8_skip_modules=skip or None,
    )


def _fsdp_quant_storage(mc) -> dict:
    # FSDP shards 4-bit weights only if their storage dtype matches the other parameters'.
    from peftkit.step.distributed import fsdp_requested

    return {"bnb_4bit_quant_storage": DTYPES[mc.dtype]} if fsdp_requested() else {}


def load_tokenizer(mc):
    from transformers import AutoTokenizer

    path = resolve(mc.name)
    try:
        tok = AutoTokenizer.from_pretrained(path, revision=mc.revision, trust_remote_code=mc.trust_remote_code)
    except OSError as e:
        raise UserError(f"model.name: cannot load a tokenizer from '{mc.name}': {str(e).splitlines()[0]}") from None
    if tok.pad_token is None:
        # Decoders ship without a pad token; padding positions are masked anyway.
        tok.pad_token = tok.eos_token
    return tok


def load(mc, task, tokenizer=None) -> Loaded:
    """Load model + tokenizer for ``task`` as the model section ``mc`` says."""
    import transformers

    transformers.logging.set_verbosity_error()
    tokenizer = tokenizer or load_tokenizer(mc)
    path = resolve(mc.name)
    dtype = DTYPES[mc.dtype]
    check_attention(mc.attn_implementation)
    attn, attn_why = attention_choice(mc.attn_implementation, dtype if mc.quantization == "none" else DTYPES[mc.compute_dtype])
    auto = task.auto_class()
    kwargs = dict(task.model_kwargs())
    qc = quantization_config(mc, list(task.head_names))
    if qc is not None:
        kwargs["quantization_config"] = qc
        kwargs["device_map"] = {"": _device_for_quantized()}
    try:
        model = auto.from_pretrained(
            path,
            revision=mc.revision,
            dtype=dtype,
            attn_implementation=attn,
            trust_remote_code=mc.trust_remote_code,
            **kwargs,
        )
    except (OSError, ValueError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise UserError(f"model.name: cannot load '{mc.name}' as {auto.__name__}: {msg}") from None
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if qc is not None:
        no_cpu_repacking(model)
    if mc.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    from peftkit.step import kernels

    fused = kernels.apply_liger(model, mc.kernels, _device_type())
    info = {
        "name": mc.name,
        "path": path,
        "model_type": model.config.model_type,
        "class": type(model).__name__,
        "dtype": mc.dtype,
        "quantization": mc.quantization,
        "attn_implementation": getattr(model.config, "_attn_implementation", attn),
        "attn_reason": attn_why,
        "kernels": fused,
    }
    return Loaded(model, tokenizer, info)


def no_cpu_repacking(model) -> None:
    """Keep bitsandbytes from re-packing 4-bit weights in place at the first no-grad forward on
    an AVX512-BF16 CPU: the packed layout needs in_features >= 64 (narrower layers fail with
    "shape '[N, 0]' is invalid"), it changes the weights' bytes between training and evaluation,
    and the same run would take another code path on an AVX2-only CPU."""
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False


def _device_for_quantized() -> str | int:
    # Under DDP every rank holds a whole copy: on its own GPU (LOCAL_RANK), not all on GPU 0.
    from peftkit.step.distributed import quantized_device

    return quantized_device()


def _device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def attention_line(info: dict) -> str:
    """Which attention and fused kernels run, and why: for the run's first log line."""
    k = info["kernels"]
    return (f"attention {info['attn_implementation']} ({info['attn_reason']}); "
            f"kernels {k['used']} ({k['reason']})")
