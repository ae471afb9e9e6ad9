"""What happens before the trainer's loop: the machine a run trains on, then the objects its
steps use.

``machine``: precision, the micro-batch split, trackers, the Accelerator, the seed, fused
kernels: everything decided once per ``Trainer``, before any data is read. ``prepare``:
model, optimizer and scheduler through accelerate, the meters and the non-finite guard:
the ``Run`` that ``Trainer.fit`` loops over. The order of the steps is the order of the
run's first log lines (the precision line first), so it is kept as it is here.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from peftkit import hardware
from peftkit.errors import UserError
from peftkit.estimate.fit import MicroBatchChoice, resolve_micro_batch
from peftkit.log import warn
from peftkit.model import backbone
from peftkit.step import distributed as dist, kernels
from peftkit.step.optim import make_optimizer
from peftkit.strategies import cast_frozen, count_params
from peftkit.training.meters import Meters
from peftkit.training.nonfinite import NonFiniteGuard
from peftkit.training.state import Run
from peftkit.training.tracking import Tracking


@dataclass
class Machine:
    """What ``machine`` decided: the train config as this device runs it, and the tools to run it."""

    precision: hardware.Precision
    tc: object  # recipe.TrainConfig with the resolved precision, micro-batch split and padding_free
    micro: MicroBatchChoice | None  # train.micro_batch_size: how the global batch was split, or None
    track: Tracking
    acc: object  # accelerate.Accelerator
    model: torch.nn.Module  # the built model, with fused kernels / compiled blocks where they pay
    kernels: dict


def machine(built, run_dir) -> Machine:
    """Precision, micro-batches, trackers, Accelerator, seed and kernels, printing what was chosen."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    precision = hardware.for_run(built.recipe, warn)  # auto -> bf16/fp16/fp32 for this machine
    tc = built.recipe.train.model_copy(update={"precision": precision.resolved})
    # train.micro_batch_size: the global batch split into what fits this device (by the estimate)
    micro = resolve_micro_batch(built.recipe, world=int(os.environ.get("WORLD_SIZE", "1")),
                                task=built.task, tokenizer=built.tokenizer)
    if micro:
        tc = tc.model_copy(update=micro.train_update())
    track = Tracking(built.recipe, run_dir)  # experiment trackers (output.report_to)
    acc = Accelerator(
        **track.accelerator_kwargs(),
        mixed_precision=precision.mixed_precision,
        gradient_accumulation_plugin=dist.accumulation_plugin(tc.grad_accum),
        cpu=not torch.cuda.is_available(),  # torchrun on CPU: gloo DDP only when accelerate is told
        dataloader_config=dist.dataloader_config(),
    )
    acc.print(f"[peftkit] {precision.line()}; {backbone.attention_line(built.backbone_info)}")
    if micro:
        acc.print(f"[peftkit] {micro.line()}")
    if tc.activation_offloading and acc.device.type != "cuda":
        raise UserError(f"train.activation_offloading: needs a CUDA device (it moves saved activations from GPU "
                        f"to host memory); this run trains on {acc.device.type}")
    set_seed(tc.seed)
    dist.check_batch_size(tc.batch_size, acc.num_processes)
    if note := dist.requested_but_not_used(acc):
        acc.print(f"[peftkit] note: {note}")
    # Fused kernels / compiled blocks where they pay; padding-free where a varlen kernel runs it.
    model, applied = kernels.apply(built.model, built.recipe, acc.device)
    tc = tc.model_copy(update={"padding_free": applied["padding_free"]})
    return Machine(precision=precision, tc=tc, micro=micro, track=track, acc=acc, model=model, kernels=applied)


def total_steps(train_examples: int, tc) -> int:
    """Optimizer steps of the run: ``train.max_steps``, else the epochs' worth (at least one)."""
    steps_per_epoch = math.ceil(math.ceil(train_examples / tc.batch_size) / tc.grad_accum)
    return tc.max_steps if tc.max_steps is not None else max(1, math.ceil(steps_per_epoch * tc.epochs))


def prepare(built, tc, acc, plan, model, data: dict, total: int, ck, log) -> Run:
    """Model, optimizer and scheduler through accelerate; the meters' estimate before any step."""
    frozen, cast = hardware.frozen_dtype(built.recipe), None
    if frozen is not None and not dist.sharded(acc):  # FSDP/ZeRO flatten a unit in one dtype
        cast = {"dtype": str(frozen).removeprefix("torch."), "bytes_saved": cast_frozen(model, frozen)}
    params = count_params(model)  # before FSDP/ZeRO shard the parameters
    opt = make_optimizer(model, tc)
    from transformers import get_scheduler

    sched = get_scheduler(tc.scheduler, opt, num_warmup_steps=int(tc.warmup_ratio * total), num_training_steps=total)
    dist.prepare_deepspeed(acc, tc)
    model, opt, sched = dist.prepare(acc, model, opt, sched)
    if tc.compile:
        model = torch.compile(model)
    stop = tc.stop_step(total)
    meters = Meters(built, tc, acc, plan, rung=stop < total)
    meters.setup(model, data["train"], total)
    acc.print(f"[peftkit] {built.strategy.name}: trainable {params[0]:,} / {params[1]:,} params "
              f"({100 * params[0] / params[1]:.2f}%)")
    ck.attach(model, built.strategy, opt, sched, log)
    guard = NonFiniteGuard(tc.nonfinite, tc.max_nonfinite_skips, acc.scaler, warn)
    return Run(data=data, total=total, stop=stop, model=model, opt=opt, sched=sched, ck=ck, guard=guard,
               meters=meters, params=params, frozen_cast=cast, on_device=guard.on_device(opt))
