"""result.json: one function builds the whole record of a finished run (schema peftkit.result/1)."""

from __future__ import annotations

import time

import torch

from peftkit.step import distributed as dist
from peftkit import hardware, provenance
from peftkit.step import measure, memory

SCHEMA = "peftkit.result/1"


def build(run, final: dict, rss, wall_s: float, artifact: dict, estimate_at_measured: dict | None) -> dict:
    """``run``: the trainer's ``Run`` after training; ``final``: the final evaluation's metrics."""
    b, acc, tc, st = run.built, run.acc, run.built.recipe.train, run.state
    measured = {"method": "cuda" if torch.cuda.is_available() else "cpu_rss",
                "rss_baseline_bytes": rss.baseline, "rss_peak_bytes": rss.peak,
                "peak_bytes": rss.peak - rss.baseline, **measure.cuda_peaks()}
    if torch.cuda.is_available():
        measured["peak_bytes"] = measured["max_allocated_bytes"]
    measured = dist.gather_memory(acc, measured)
    trainable, total = run.params
    return {
        "schema": SCHEMA,
        "run": {
            "name": b.recipe.name,
            "strategy": b.strategy.name,
            "task": b.recipe.task.kind,
            "model": b.backbone_info,
            "seed": tc.seed,
            "recipe_hash": b.recipe.hash(),
            "recipe": b.recipe.to_dict(),
            "precision": hardware.resolve(tc.precision).record(),  # cached: what the trainer resolved
            "frozen_weights": run.frozen_cast,  # {dtype, bytes_saved} when stored in the autocast dtype
            "world_size": acc.num_processes,
            "distributed_type": dist.distributed_type(acc),  # NO, MULTI_CPU, MULTI_GPU, FSDP, DEEPSPEED
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
        "task": b.task.info(),
        "params": {"total": total, "trainable": trainable,
                   "trainable_pct": 100.0 * trainable / total, "can_merge": b.strategy.can_merge},
        "memory": memory.section(run.estimate, run.probe.result, measured, estimate_at_measured),
        # Speed numbers cover what this process trained (after a resume: the resumed part).
        "speed": {**run.timer.summary(), "wall_s": wall_s, **run.times,
                  "eval_samples_per_s": final.get("eval_samples_per_s"),
                  "steps": st.step, "epochs_started": st.epoch, "train_examples": len(run.train),
                  "resumed_from_step": run.resumed_from},
        "metrics": {"eval": final, "eval_split": tc.eval_split, "history": st.history,
                    "primary_metric": b.task.primary_metric, "train_loss": st.train_loss(tc.log_every),
                    "nonfinite_skipped_steps": st.nonfinite_skips},
        "artifact": artifact,
        "env": provenance.environment(),
    }
