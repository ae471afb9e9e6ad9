"""The one training loop, for every strategy and task, on accelerate.

Same seed, same data order, same step budget and the same evaluation for every strategy:
that is what makes the numbers of a comparison comparable.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import torch

from . import distributed as dist
from . import flops, measure, memory, packing, provenance
from .build import Built
from .checkpoint import Checkpointer, warn
from .errors import UserError
from .nonfinite import NonFiniteGuard
from .io import atomic_write_json, atomic_write_text, save_safetensors
from .strategies import count_params

SCHEMA = "peftkit.result/1"


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int, mega: int = 50) -> list[list[int]]:
    """Shuffled batches of similar length: less padding, same randomness for every strategy.

    Indices are shuffled, cut into mega-batches of ``mega * batch_size``, each sorted by
    length and cut into batches; batch order is shuffled again, then the batch holding the
    longest example goes first (as in HF's sampler): the peak allocation comes at step 1, so
    an out-of-memory error shows at once and later, smaller batches reuse that memory
    instead of fragmenting the heap upwards (MiniLM, 16 steps: CPU peak RSS over baseline
    0.93 -> 0.69 GiB full, 0.86 -> 0.67 GiB LoRA).
    """
    rng = random.Random(seed)
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    size = mega * batch_size
    batches = []
    for i in range(0, len(idx), size):
        chunk = sorted(idx[i : i + size], key=lambda j: -lengths[j])
        batches += [chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    if batches:  # each batch is sorted longest-first
        batches.insert(0, batches.pop(max(range(len(batches)), key=lambda b: lengths[batches[b][0]])))
    return batches


def shuffled_batches(n: int, batch_size: int, seed: int) -> list[list[int]]:
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    return [idx[k : k + batch_size] for k in range(0, n, batch_size)]


def make_optimizer(model, tc):
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if tc.optimizer in ("adamw8bit", "paged_adamw8bit"):
        import bitsandbytes as bnb

        cls = bnb.optim.PagedAdamW8bit if tc.optimizer == "paged_adamw8bit" else bnb.optim.AdamW8bit
        return cls([g for g in groups if g["params"]], lr=tc.lr)
    kw = {"foreach": True} if tc.optimizer == "adamw_foreach" else {"fused": True} if tc.optimizer == "adamw_fused" else {"foreach": False}
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=tc.lr, **kw)


class Trainer:
    def __init__(self, built: Built, run_dir: str | Path, resume: bool = False):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.b = built
        self.tc = built.recipe.train
        self.run_dir = Path(run_dir)
        self.resume = resume  # continue from the run dir's latest intact checkpoint, if any
        if self.tc.precision == "fp16" and not torch.cuda.is_available():
            raise UserError("train.precision: fp16 autocast needs a CUDA GPU; use bf16 or fp32 on CPU")
        self.acc = Accelerator(
            mixed_precision="no" if self.tc.precision == "fp32" else self.tc.precision,
            gradient_accumulation_plugin=dist.accumulation_plugin(self.tc.grad_accum),
            cpu=not torch.cuda.is_available(),  # torchrun on CPU: gloo DDP only when accelerate is told
            dataloader_config=dist.dataloader_config(),
        )
        set_seed(self.tc.seed)
        dist.check_batch_size(self.tc.batch_size, self.acc.num_processes)
        if note := dist.requested_but_not_used(self.acc):
            self.acc.print(f"[peftkit] note: {note}")
        self.log_f = None
        self.tb = None

    # -- data -----------------------------------------------------------------------------
    def _loader(self, ds, batches, collate=None):
        from torch.utils.data import DataLoader

        # Own generator: loaders never draw from the global RNG (dropout), so a resume is exact.
        return DataLoader(ds, batch_sampler=batches, collate_fn=collate or self.b.task.collate,
                          num_workers=self.tc.num_workers, persistent_workers=self.tc.num_workers > 0,
                          generator=torch.Generator().manual_seed(self.tc.seed))

    def train_batches(self, ds, epoch: int) -> list[list[int]]:
        seed = self.tc.seed * 1000 + epoch
        if self.tc.group_by_length:
            return length_grouped_batches(list(ds["length"]), self.tc.batch_size, seed)
        return shuffled_batches(len(ds), self.tc.batch_size, seed)

    def eval_batches(self, ds) -> list[list[int]]:
        # Sorted by length: eval order does not change metrics, and padding costs time.
        lengths = list(ds["length"])
        order = sorted(range(len(ds)), key=lengths.__getitem__)
        bs = self.tc.batch_size * 2
        return [order[k : k + bs] for k in range(0, len(order), bs)]

    # -- logging --------------------------------------------------------------------------
    def log(self, **rec):
        if self.acc.is_main_process and self.log_f is not None:
            self.log_f.write(json.dumps(rec) + "\n")
            self.log_f.flush()
            if self.tb is not None:
                for k, v in _scalars(rec):
                    self.tb.add_scalar(k, v, rec["step"])

    # -- evaluation -----------------------------------------------------------------------
    def evaluate(self, model, ds) -> dict:
        shards, keep = dist.eval_shards(self.eval_batches(ds), self.acc.process_index, self.acc.num_processes)
        loader = dist.device_loader(self._loader(ds, shards), self.acc.device)
        model.eval()
        items = []
        t0 = time.perf_counter()
        with torch.no_grad(), self.acc.autocast():
            for idx, k, batch in zip(shards, keep, loader):
                p, r = self.b.task.eval_step(model, batch)
                if k:
                    items += zip(idx, p, r)
        # Every example once, in dataset order, whatever the number of processes.
        items = dist.gather_sorted(self.acc, items)
        preds, refs = [p for _, p, _ in items], [r for _, _, r in items]
        dt = time.perf_counter() - t0
        model.train()
        m = self.b.task.metrics(preds, refs)
        m["examples"] = len(refs)
        m["eval_s"] = dt
        m["eval_samples_per_s"] = len(refs) / dt if dt else None
        return m

    # -- training -------------------------------------------------------------------------
    def fit(self) -> dict:
        b, tc = self.b, self.tc
        t_start = time.perf_counter()
        data = b.task.datasets()
        data_s = time.perf_counter() - t_start
        for note in b.task.notes():  # truncation, skipped bad rows
            warn(note)
        ck = Checkpointer(self.acc, self.run_dir, b.recipe, self.resume)
        resumed = ck.begin()
        if self.acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.log_f = open(self.run_dir / "log.jsonl", "a", encoding="utf-8")
            self.tb = _tensorboard(self.run_dir / "tb") if b.recipe.output.tensorboard else None
        train = data["train"]
        steps_per_epoch = math.ceil(math.ceil(len(train) / tc.batch_size) / tc.grad_accum)
        total = tc.max_steps if tc.max_steps is not None else max(1, math.ceil(steps_per_epoch * tc.epochs))
        model = b.model
        trainable, total_params = count_params(model)  # before FSDP/ZeRO shard the parameters
        opt = make_optimizer(model, tc)
        from transformers import get_scheduler

        sched = get_scheduler(tc.scheduler, opt, num_warmup_steps=int(tc.warmup_ratio * total), num_training_steps=total)
        dist.prepare_deepspeed(self.acc, tc)
        model, opt, sched = dist.prepare(self.acc, model, opt, sched)
        if tc.compile:
            model = torch.compile(model)
        t_est = time.perf_counter()
        est = self._estimate(train, total)
        estimate_s = time.perf_counter() - t_est
        self.acc.print(f"[peftkit] {b.strategy.name}: trainable {trainable:,} / {total_params:,} params "
                       f"({100 * trainable / total_params:.2f}%)")

        timer = measure.StepTimer(warmup=min(3, max(0, total // 5)))
        counter = _flop_counter(self.acc.unwrap_model(model)) if not tc.compile else None
        measure.cuda_reset()
        guard = NonFiniteGuard(tc.nonfinite, tc.max_nonfinite_skips, self.acc.scaler, warn)
        losses: list[float] = []
        history = []
        step, epoch, skip, t_train = 0, 0, 0, time.perf_counter()
        if resumed is not None:  # after prepare: RNG, optimizer and scheduler as they were at that step
            st = ck.restore(model, b.strategy, opt, sched)
            step, epoch, skip, losses, history, guard.skips = (
                st["step"], st["epoch"], st["batches"], st["losses"], st["history"], st["nonfinite_skips"])
            self.log(event="resumed", step=step, checkpoint=resumed.path.name)
        probe = memory.StepPeak(at=min(total, step + 2))  # live peak of one step after warm-up
        model.train()
        progress = _progress(total, enabled=tc.progress and self.acc.is_main_process)
        with measure.PeakRSS() as rss, progress as bar, ck.signals:
            while step < total:
                rank, world = self.acc.process_index, self.acc.num_processes
                global_batches, local = dist.train_shards(self.train_batches(train, epoch), rank, world)
                if skip >= len(local):  # resumed exactly at the end of an epoch
                    epoch, skip = epoch + 1, 0
                    continue
                # A resume skips the batches this epoch already used (the data position).
                global_batches, local, consumed, skip = global_batches[skip:], local[skip:], skip, 0
                weights = iter([dist.loss_weight(len(s), len(g), world) for g, s in zip(global_batches, local)])
                collate = packing.PaddingFree() if tc.padding_free else None
                it = iter(dist.device_loader(self._loader(train, local, collate), self.acc.device))
                while step < total:
                    micro = []
                    for _ in range(tc.grad_accum):
                        try:
                            micro.append(next(it))
                        except StopIteration:
                            break
                    if not micro:
                        break
                    consumed += len(micro)
                    counts = [packing.batch_counts(x) for x in micro]
                    n_samples, n_tokens = dist.reduce_sum(self.acc, [sum(c[0] for c in counts),
                                                                     sum(c[1] for c in counts)])
                    # Sync (and step) on the group's last micro-batch, also for a short group at an
                    # epoch's end; scaled so the gradient is the group's mean.
                    self.acc.step = tc.grad_accum - len(micro)
                    group_scale = tc.grad_accum / len(micro)
                    with timer.step(n_samples, n_tokens), probe.around(step + 1, model, opt,
                                                                      memory.batch_shape(micro[0])):
                        loss_sum, ok = 0.0, True
                        for batch in micro:
                            with self.acc.accumulate(model):
                                loss = model(**batch).loss
                                w = next(weights)
                                s = w * group_scale
                                self.acc.backward(loss if s == 1.0 else loss * s)
                                loss_sum += loss.detach().float().item() * w
                                if self.acc.sync_gradients:
                                    norm = (self.acc.clip_grad_norm_(model.parameters(), tc.max_grad_norm)
                                            if tc.max_grad_norm else None)
                                    ok = guard.step_ok(loss_sum, norm, model, step + 1)
                                if ok:
                                    opt.step()
                                    sched.step()
                                opt.zero_grad(set_to_none=True)
                    if counter is not None:
                        timer.add_flops(counter.take())
                    step += 1
                    loss_sum = dist.reduce_sum(self.acc, [loss_sum])[0] / self.acc.num_processes
                    if ok:
                        losses.append(loss_sum / len(micro))
                    else:
                        self.log(step=step, epoch=epoch, nonfinite_skipped=guard.skips)
                    if step % tc.log_every == 0 or step == total:
                        window = losses[-tc.log_every:] or [float("nan")]
                        self.log(step=step, epoch=epoch, loss=sum(window) / len(window), lr=sched.get_last_lr()[0])
                    bar.update(step, losses[-1] if losses else float("nan"), timer)
                    if tc.eval_every and step % tc.eval_every == 0 and step < total:
                        m = self.evaluate(model, data["validation"])
                        history.append({"step": step, **m})
                        self.log(step=step, eval=m)
                    ck.step_end(step, model, b.strategy, opt, sched, self.log_f, dict(
                        step=step, epoch=epoch, batches=consumed, losses=losses, history=history,
                        nonfinite_skips=guard.skips))
                epoch += 1
        train_s = time.perf_counter() - t_train
        if counter is not None:
            counter.close()
            timer.flops = dist.reduce_sum(self.acc, [timer.flops])[0]
        final = self.evaluate(model, data[tc.eval_split])
        self.log(step=step, eval_final=final)
        sd = dist.strategy_state_dict(self.acc, model, b.strategy) if b.recipe.output.save_weights else None
        model = self.acc.unwrap_model(model)
        split = {"load_s": b.load_s, "data_s": data_s, "estimate_s": estimate_s, "train_s": train_s,
                 "eval_s": final.get("eval_s")}
        result = self._result(model, trainable, total_params, timer, rss, losses, final, history, split,
                              b.load_s + time.perf_counter() - t_start, len(train), step, epoch)
        result["memory"] = memory.section(est, probe.result, result["memory"]["measured"], self._estimate_at(probe))
        # Speed numbers cover what this process trained (after a resume: the resumed part).
        result["speed"]["resumed_from_step"] = resumed.step if resumed is not None else None
        result["metrics"]["nonfinite_skipped_steps"] = guard.skips
        if self.acc.is_main_process:
            self._save(sd, result)
            self.log_f.close()
            if self.tb is not None:
                self.tb.close()
        self.acc.wait_for_everyone()
        self.model = model
        return result

    def _estimate(self, train, total_steps: int) -> dict:
        """The memory estimate at the longest batch this run will train on (known up front)."""
        from .estimate import estimate

        lengths = list(train["length"])
        longest, epoch, seen = 0, 0, 0
        while seen < total_steps * self.tc.grad_accum:
            for batch in self.train_batches(train, epoch)[: total_steps * self.tc.grad_accum - seen]:
                longest = max(longest, max(lengths[i] for i in batch))
                seen += 1
            epoch += 1
        return self._estimate_safe(batch_size=max(1, self.tc.batch_size // self.acc.num_processes),
                                   seq_len=longest, seq_source="longest batch of this run")

    def _estimate_safe(self, **kw) -> dict:
        from .estimate import estimate

        try:
            return estimate(self.b.recipe, task=self.b.task, tokenizer=self.b.tokenizer,
                            device="cuda" if torch.cuda.is_available() else "cpu", **kw)
        except Exception as e:  # an estimate must never stop a training run
            return {"error": f"{e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}"}

    def _estimate_at(self, probe) -> dict | None:
        """The estimate at the measured step's batch shape, to compare like with like."""
        shape = (probe.result or {}).get("batch_shape")
        if not shape or self.tc.padding_free:
            return None
        return self._estimate_safe(batch_size=shape[0], seq_len=shape[1], seq_source="the measured step's batch")

    def _result(self, model, trainable, total_params, timer, rss, losses, final, history, split, wall_s,
                n_train, steps, epochs) -> dict:
        b = self.b
        tail = losses[-max(1, min(len(losses), self.tc.log_every)):]
        measured = {"method": "cuda" if torch.cuda.is_available() else "cpu_rss",
                    "rss_baseline_bytes": rss.baseline, "rss_peak_bytes": rss.peak,
                    "peak_bytes": rss.peak - rss.baseline, **measure.cuda_peaks()}
        if torch.cuda.is_available():
            measured["peak_bytes"] = measured["max_allocated_bytes"]
        measured = dist.gather_memory(self.acc, measured)
        return {
            "schema": SCHEMA,
            "run": {
                "name": b.recipe.name,
                "strategy": b.strategy.name,
                "task": b.recipe.task.kind,
                "model": b.backbone_info,
                "seed": self.tc.seed,
                "recipe_hash": b.recipe.hash(),
                "recipe": b.recipe.to_dict(),
                "world_size": self.acc.num_processes,
                "distributed_type": dist.distributed_type(self.acc),  # NO, MULTI_CPU, MULTI_GPU, FSDP, DEEPSPEED
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
            "task": b.task.info(),
            "params": {"total": total_params, "trainable": trainable,
                       "trainable_pct": 100.0 * trainable / total_params, "can_merge": b.strategy.can_merge},
            "memory": {"measured": measured},
            "speed": {**timer.summary(), "wall_s": wall_s, **split,
                      "eval_samples_per_s": final.get("eval_samples_per_s"),
                      "steps": steps, "epochs_started": epochs, "train_examples": n_train},
            "metrics": {"eval": final, "eval_split": self.tc.eval_split, "history": history,
                        "primary_metric": b.task.primary_metric,
                        "train_loss": sum(tail) / len(tail) if tail else None},
            "artifact": {},
            "env": provenance.environment(),
        }

    def _save(self, sd, result):
        from .recipe import dump_yaml

        d = self.run_dir
        atomic_write_text(d / "recipe.yaml", dump_yaml(self.b.recipe))
        if sd is not None:
            save_safetensors(d / "strategy.safetensors", sd)
            result["artifact"] = {"strategy_weights": "strategy.safetensors",
                                  "strategy_bytes": (d / "strategy.safetensors").stat().st_size,
                                  "tensors": len(sd)}
        atomic_write_json(d / "result.json", result)


def _flop_counter(model):
    """Model FLOPs per step for result.json (peftkit.flops); counting must never stop a run."""
    try:
        return flops.FlopCounter(model)
    except Exception as e:
        warn(f"model FLOPs are not counted: {e.__class__.__name__}: {e}")
        return None


def _tensorboard(path):
    """A SummaryWriter when tensorboard is installed (it is optional), else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(path))


def _scalars(rec: dict, prefix: str = ""):
    for k, v in rec.items():
        if isinstance(v, dict):
            yield from _scalars(v, f"{prefix}{k}/")
        elif isinstance(v, (int, float)) and k != "step":
            yield f"{prefix}{k}", v


class _progress:
    """A rich progress bar with loss and throughput (silent when disabled)."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.p = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                              TextColumn("{task.fields[info]}"), transient=False)
            self.p.__enter__()
            self.t = self.p.add_task("train", total=self.total, info="")
        return self

    def update(self, step, loss, timer):
        if self.enabled:
            s = timer.summary()
            sps = s["train_samples_per_s"]
            info = f"loss {loss:.4f}" + (f" · {sps:.1f} samples/s" if sps else "")
            self.p.update(self.t, completed=step, info=info)

    def __exit__(self, *exc):
        if self.enabled:
            self.p.__exit__(*exc)
