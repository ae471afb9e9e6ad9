"""Multi-process training (DDP, FSDP, DeepSpeed through accelerate): who sees which examples.

``train.batch_size`` is GLOBAL: the examples of one micro-step summed over all processes
(an optimizer step sees ``batch_size * grad_accum`` examples whatever the number of
processes). The trainer builds the same global batch list on every rank; each rank takes
its strided share of every batch (``batch[rank::world]``), so 1 process and N processes
see the same examples per step and numbers stay comparable across machines.

accelerate's own sharding is not used for this: with a list of variable-size batches it
hands out WHOLE batches round-robin (N global batches per step) and pads the last round
with repeated batches that ``gather_for_metrics`` cannot remove (it has no batch size to
compute the remainder from), so evaluation counted some examples twice.
"""

from __future__ import annotations

import os
import shlex
import sys

import torch

from peftkit.errors import UserError

LAUNCHERS = ("none", "torchrun", "accelerate")


def env_rank() -> int:
    """Global rank from the launcher's environment (before any process group exists)."""
    return int(os.environ.get("RANK", "0"))


def env_local_rank() -> int | None:
    v = os.environ.get("LOCAL_RANK")
    return int(v) if v is not None else None


def fsdp_requested() -> bool:
    """accelerate launch was given an FSDP config (set before any process group exists)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def deepspeed_requested() -> bool:
    """accelerate launch was given a DeepSpeed config."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def launched() -> bool:
    """True inside a process started by torchrun / accelerate launch."""
    return "LOCAL_RANK" in os.environ or "WORLD_SIZE" in os.environ


def requested_but_not_used(acc) -> str | None:
    """A one-line notice about how FSDP/DeepSpeed from the launcher really runs; refuses what cannot.

    accelerate applies FSDP and DeepSpeed only on accelerators: on CPU processes it would
    silently run DDP (gloo). FSDP2 is applied by peftkit itself there (``cpu_fsdp``); FSDP1 and
    DeepSpeed are refused rather than run as something else.
    """
    if cpu_fsdp(acc):
        return "FSDP2 on CPU processes: peftkit shards the model with torch's fully_shard (gloo)"
    for var, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DEEPSPEED")):
        if os.environ.get(var, "false").lower() == "true" and acc.distributed_type.value != name:
            hint = (" on CPU processes, use FSDP2 (recipes/accelerate/fsdp.yaml)" if name == "FSDP" else "")
            raise UserError(f"{name} was requested but accelerate would run {acc.distributed_type.value} here "
                            f"({name}{' version 1' if name == 'FSDP' else ''} needs GPUs){hint}")
    return None


def cpu_fsdp(acc=None) -> bool:
    """FSDP2 requested on processes accelerate runs as MULTI_CPU: peftkit applies ``fully_shard`` itself."""
    if not fsdp_requested() or os.environ.get("FSDP_VERSION", "1") != "2" or torch.cuda.is_available():
        return False
    return acc is None or acc.distributed_type.value == "MULTI_CPU"


def distributed_type(acc) -> str:
    """NO, MULTI_CPU, MULTI_GPU, FSDP, DEEPSPEED: what really runs (FSDP for peftkit's CPU sharding)."""
    return "FSDP" if cpu_fsdp(acc) else str(acc.distributed_type.value)


def sharded(acc) -> bool:
    """Parameters/optimizer state live in shards (no single-file checkpoint of the training state)."""
    return distributed_type(acc) in ("FSDP", "DEEPSPEED")


def prepare(acc, model, opt, sched):
    """``acc.prepare``; with ``cpu_fsdp``: torch's FSDP2 per transformer block and the root, then the rest."""
    if not (cpu_fsdp(acc) and acc.num_processes > 1):
        return acc.prepare(model, opt, sched)
    shard_model(model, opt)
    opt, sched = acc.prepare(opt, sched)  # the model is not given to accelerate: it would add DDP on top
    return model, opt, sched


def shard_model(model, opt) -> None:
    """``fully_shard`` each block named in ``_no_split_modules`` and the root; the optimizer gets the DTensors.

    The optimizer has no state yet (AdamW allocates it at the first step), so swapping its
    parameters for the sharded ones by name is exact. ``FSDP_RESHARD_AFTER_FORWARD`` as accelerate sets it.
    """
    from torch.distributed.fsdp import fully_shard

    names = {id(p): n for n, p in model.named_parameters()}
    groups = [[names[id(p)] for p in g["params"]] for g in opt.param_groups]
    blocks = set()
    for m in model.modules():
        blocks |= set(getattr(m, "_no_split_modules", None) or [])
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() not in ("false", "no_shard", "2", "5")
    for m in reversed(list(model.modules())):  # children before parents
        if type(m).__name__ in blocks:
            fully_shard(m, reshard_after_forward=reshard)
    fully_shard(model, reshard_after_forward=False)
    new = dict(model.named_parameters())
    for g, ns in zip(opt.param_groups, groups):
        g["params"] = [new[n] for n in ns]


def _full(sd: dict) -> dict[str, torch.Tensor]:
    """Sharded (DTensor) entries gathered to full tensors: collective, the same order on every rank."""
    from torch.distributed.tensor import DTensor

    return {k: v.full_tensor().detach().cpu() if isinstance(v, DTensor) else v for k, v in sd.items()}


def quiet_rank() -> None:
    """No progress bars from ranks other than 0 (rank 0 speaks for the run)."""
    os.environ["TQDM_DISABLE"] = "1"
    import transformers

    transformers.utils.logging.disable_progress_bar()


def check_batch_size(batch_size: int, world: int) -> None:
    if batch_size < world:
        raise UserError(f"train.batch_size: {batch_size} is the GLOBAL batch and must be at least the number "
                        f"of processes ({world})")


def train_shards(batches: list[list[int]], rank: int, world: int) -> tuple[list[list[int]], list[list[int]]]:
    """(global batches kept, this rank's share of each).

    A global batch with fewer examples than processes (at most one per epoch, the last) is
    dropped when world > 1: a rank with nothing to do would leave DDP waiting for its gradients.
    """
    if world == 1:
        return batches, batches
    kept = [b for b in batches if len(b) >= world]
    return kept, [b[rank::world] for b in kept]


def eval_shards(batches: list[list[int]], rank: int, world: int) -> tuple[list[list[int]], list[bool]]:
    """This rank's share of every eval batch and whether to keep its outputs.

    Every rank runs the same number of forward passes (FSDP/ZeRO-3 forwards are collective);
    a rank whose share is empty runs the batch's first example and drops the output.
    """
    shards, keep = [], []
    for b in batches:
        s = b[rank::world]
        shards.append(s if s else b[:1])
        keep.append(bool(s))
    return shards, keep


def loss_weight(local: int, global_: int, world: int) -> float:
    """Scale of a rank's mean loss so that DDP's gradient average equals the global mean.

    Exactly 1.0 when the shares are equal; only an uneven batch (size not a multiple of the
    number of processes) is reweighted. Losses that average over tokens are weighted by
    examples here, the same approximation gradient accumulation makes.
    """
    return 1.0 if world == 1 else local * world / global_


def accumulation_plugin(steps: int):
    """Gradient accumulation: accelerate syncs every ``steps`` micro-batches and at the end of
    the epoch's loader (a short last group), resetting its count there. The trainer fetches
    micro-batches one at a time, so the loader's end is known exactly at its last batch.
    """
    from accelerate.utils import GradientAccumulationPlugin

    return GradientAccumulationPlugin(num_steps=steps, sync_with_dataloader=True)


def dataloader_config():
    """split_batches=True: batches are global, so accelerate steps the LR scheduler once per
    optimizer step instead of once per process (and sizes DeepSpeed batches per device)."""
    from accelerate.utils import DataLoaderConfiguration

    return DataLoaderConfiguration(split_batches=True)


def device_loader(loader, device):
    """A DataLoader already holding this rank's batches, moved to ``device`` by accelerate.

    ``num_processes=1``: no further sharding; the loader still registers with accelerate's
    gradient state, so ``accumulate`` syncs at the end of an epoch.
    """
    from accelerate.data_loader import prepare_data_loader

    return prepare_data_loader(loader, device=device, num_processes=1, process_index=0, put_on_device=True)


def gather_sorted(acc, items: list[tuple]) -> list[tuple]:
    """All ranks' (index, ...) tuples, each index once, in dataset order (same as 1 process)."""
    from accelerate.utils import gather_object

    items = gather_object(items) if acc.num_processes > 1 else items
    return sorted(items, key=lambda t: t[0])


def reduce_sum(acc, values: list[float]) -> list[float]:
    """Sum of a few numbers over all ranks (identity with one process)."""
    if acc.num_processes == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=acc.device)
    return acc.reduce(t, reduction="sum").tolist()


def gather_memory(acc, measured: dict) -> dict:
    """Memory of every rank; ``peak_bytes`` is the largest (each process holds its own copy)."""
    if acc.num_processes == 1:
        return measured
    from accelerate.utils import gather_object

    per_rank = gather_object([measured])
    return {**measured, "peak_bytes": max(m["peak_bytes"] for m in per_rank), "per_rank": per_rank,
            "peak_of": "max over ranks"}


def prepare_deepspeed(acc, tc) -> None:
    """DeepSpeed needs its micro-batch size before ``prepare`` when no loader is prepared with the model."""
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    cfg = plugin.deepspeed_config
    micro = max(1, tc.batch_size // acc.num_processes)
    if cfg.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        cfg["train_micro_batch_size_per_gpu"] = micro  # accelerate derives train_batch_size from it


def strategy_state_dict(acc, wrapped, strategy) -> dict[str, torch.Tensor]:
    """The strategy's tensors, full (not sharded). Collective under FSDP/DeepSpeed: call on every rank."""
    from accelerate.utils import DistributedType

    model = acc.unwrap_model(wrapped)
    if cpu_fsdp(acc):
        return _full(strategy.state_dict(model))
    if acc.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return strategy.state_dict(model)
    wanted = {_clean(n) for n in strategy.state_dict(model)}
    full = acc.get_state_dict(wrapped)  # gathers shards; on rank 0 only for some configs
    return {_clean(k): v for k, v in (full or {}).items() if _clean(k) in wanted}


def _clean(name: str) -> str:
    # FSDP1 wraps submodules; their parameters carry this prefix in named_parameters.
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")


def quantized_device() -> str | int:
    """Device for a bitsandbytes backbone: this process's GPU under DDP (LOCAL_RANK), else GPU 0/CPU."""
    if not torch.cuda.is_available():
        return "cpu"
    local = env_local_rank()
    return local if local is not None else torch.cuda.current_device()


def launch_command(args: list[str], launcher: str = "none", num_processes: int = 1,
                   config_file: str | None = None, cpu: bool | None = None) -> list[str]:
    """argv that runs ``peftkit ARGS`` under a launcher (used by ``--launcher`` and by compare).

    On a machine without CUDA, accelerate's ``--cpu`` starts ONE process; ``--multi_gpu``
    (without ``--cpu``) starts N processes on the gloo backend, as torchrun does.
    """
    py = sys.executable
    if launcher == "none":
        return [py, "-m", "peftkit", *args]
    if launcher == "torchrun":
        return [py, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={num_processes}",
                "-m", "peftkit", *args]
    if launcher == "accelerate":
        deepspeed_refusal(config_file)  # one line here, not a traceback from every launched process
        cmd = [py, "-m", "accelerate.commands.launch"]
        if config_file:
            cmd += ["--config_file", config_file]
        if num_processes > 1 or not config_file:
            cmd += ["--num_processes", str(num_processes), "--num_machines", "1"]
            if not config_file and num_processes > 1:
                cmd += ["--multi_gpu"]
        if not config_file and num_processes == 1 and (cpu if cpu is not None else not torch.cuda.is_available()):
            cmd += ["--cpu"]
        if not config_file:
            cmd += ["--mixed_precision", "no", "--dynamo_backend", "no"]  # the recipe's train.precision rules
        return [*cmd, "-m", "peftkit", *args]
    raise UserError(f"--launcher: unknown '{launcher}' (known: {', '.join(LAUNCHERS)})")


def deepspeed_refusal(config_file: str | None) -> None:
    """Refuse an accelerate config asking for DeepSpeed ZeRO where it cannot run, saying why.

    Causes seen (CPU machine, accelerate 1.x, deepspeed 0.19.8): without CUDA, accelerate
    turns a DEEPSPEED config into MULTI_CPU (it applies DeepSpeed only on accelerators), so each
    process would refuse in ``requested_but_not_used`` after the launch, under a torchrun
    traceback; without the package, ``accelerate launch`` itself dies with an ImportError.
    """
    if not config_file:
        return
    import importlib.util

    import yaml

    try:
        cfg = yaml.safe_load(open(config_file, encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"--accelerate-config {config_file}: cannot read ({e.__class__.__name__}: {e})") from None
    if not isinstance(cfg, dict) or str(cfg.get("distributed_type", "")).upper() != "DEEPSPEED":
        return
    why = None
    if not torch.cuda.is_available():
        why = ("this machine has no CUDA GPU, and accelerate applies DeepSpeed only on GPUs (it would run "
               "MULTI_CPU instead); on CPU processes use FSDP2 (recipes/accelerate/fsdp.yaml) or DDP")
    elif importlib.util.find_spec("deepspeed") is None:
        why = "deepspeed is not installed (pip install 'peftkit[deepspeed]')"
    if why:
        raise UserError(f"--accelerate-config {config_file}: DeepSpeed ZeRO cannot run here: {why}")


def format_command(argv: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)
