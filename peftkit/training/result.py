"""result.json: one function builds the whole record of a finished run (schema peftkit.result/1)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from peftkit import hardware, provenance
from peftkit.io import atomic_write_json, save_safetensors
from peftkit.step import distributed as dist
from peftkit.training.state import TrainState

SCHEMA = "peftkit.result/1"


@dataclass
class Finished:
    """What ``build`` needs of a finished run: typed, so the record does not depend on the
    trainer's internals."""

    built: object  # peftkit.model.build.Built
    acc: object  # accelerate.Accelerator
    params: tuple[int, int]  # (trainable, total), before FSDP/ZeRO shard them
    frozen_cast: dict | None  # frozen weights stored in the autocast dtype (model.frozen_dtype), or None
    state: TrainState
    train_examples: int
    final: dict  # the final evaluation's metrics
    measured: dict  # Meters.record(): {"memory": ..., "speed": ...}
    times: dict  # load_s, data_s, train_s, eval_s, ...
    wall_s: float
    artifact: dict
    resumed_from: int | None = None
    micro_batch: dict | None = None  # train.micro_batch_size's choice (estimate.fit), or None
    rung_of: int | None = None  # a search rung: the steps of the whole budget (validation only)
    kernels: dict | None = None  # step.kernels.report(): attention, fused kernels, compile
    forgetting: dict | None = None  # tasks.forgetting.after(): LM loss on general text, or None


def build(f: Finished) -> dict:
    b, acc, tc, st = f.built, f.acc, f.built.recipe.train, f.state
    trainable, total = f.params
    metrics = {"eval": f.final, "eval_split": tc.eval_split, "history": st.history,
               "primary_metric": b.task.primary_metric, "train_loss": st.train_loss(tc.log_every),
               "nonfinite_skipped_steps": st.nonfinite_skips}
    if f.rung_of is not None:  # a search rung: scored on validation, stopped early
        metrics.update(eval_split="validation", stopped_at=st.step, total_steps=f.rung_of)
    return {
        "schema": SCHEMA,
        "run": {
            "name": b.recipe.name,
            "strategy": b.strategy.name,
            "task": b.recipe.task.kind,
            "model": b.backbone_info,
            "seed": tc.seed,
            "recipe_hash": b.recipe.hash(),
            "micro_batch": f.micro_batch,
            "kernels": f.kernels,
            "recipe": b.recipe.to_dict(),
            "precision": hardware.resolve(tc.precision).record(),  # cached: what the trainer resolved
            "frozen_weights": f.frozen_cast,  # {dtype, bytes_saved} when stored in the autocast dtype
            "world_size": acc.num_processes,
            "distributed_type": dist.distributed_type(acc),  # NO, MULTI_CPU, MULTI_GPU, FSDP, DEEPSPEED
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
        "task": b.task.info(),
        "params": {"total": total, "trainable": trainable,
                   "trainable_pct": 100.0 * trainable / total, "can_merge": b.strategy.can_merge},
        "memory": f.measured["memory"],
        # Speed numbers cover what this process trained (after a resume: the resumed part).
        "speed": {**f.measured["speed"], "wall_s": f.wall_s, **f.times,
                  "eval_samples_per_s": f.final.get("eval_samples_per_s"),
                  "steps": st.step, "epochs_started": st.epoch, "train_examples": f.train_examples,
                  "resumed_from_step": f.resumed_from},
        "metrics": metrics,
        "forgetting": f.forgetting,
        "artifact": f.artifact,
        "env": provenance.environment(),
    }


def save_weights(run_dir: Path, sd: dict | None) -> dict:
    """The strategy's trained tensors as ``strategy.safetensors``; the ``artifact`` section."""
    if sd is None:
        return {}
    path = run_dir / "strategy.safetensors"
    sha = save_safetensors(path, sd)  # recorded: export, predict, resume and report check the file against it
    return {"strategy_weights": path.name, "strategy_bytes": path.stat().st_size, "tensors": len(sd),
            "strategy_sha256": sha}


def write(run_dir: Path, res: dict, predictions: dict) -> None:
    """predictions.json (per example, for paired bootstraps), then result.json: a run is done
    when result.json exists."""
    atomic_write_json(run_dir / "predictions.json", {"split": res["metrics"]["eval_split"], **predictions})
    atomic_write_json(run_dir / "result.json", res)
