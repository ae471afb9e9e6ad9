"""The evaluation loop: the task's metrics over one split, with every example counted once on
any number of processes (what ``Trainer.evaluate`` runs, during training and at its end)."""

from __future__ import annotations

import time

import torch

from peftkit.step import distributed as dist


def evaluate(task, plan, acc, model, ds) -> tuple[dict, dict]:
    """(metrics, per-example predictions and references: for paired bootstraps)."""
    shards, keep, loader = plan.evaluation(ds)
    model.eval()
    items, t0 = [], time.perf_counter()
    with torch.no_grad(), acc.autocast():
        for idx, k, batch in zip(shards, keep, loader):
            p, r, loss = task.eval_outputs(model, batch)
            if k:  # False: a stand-in batch, run only because FSDP/ZeRO-3 forwards are collective
                items += zip(idx, p, r, loss or [None] * len(p))
    items = dist.gather_sorted(acc, items)  # every example once, in dataset order, any world size
    dt = time.perf_counter() - t0
    model.train()
    preds, refs = [x[1] for x in items], [x[2] for x in items]
    losses = [x[3] for x in items if x[3] is not None]
    m = task.metrics(preds, refs)
    if losses and "loss" not in m:  # a task whose metrics have no loss: the mean per-example loss
        m["loss"] = sum(losses) / len(losses)
    m.update(examples=len(refs), eval_s=dt, eval_samples_per_s=len(refs) / dt if dt else None)
    return m, {"predictions": preds, "references": refs}
