"""The one training loop, for every strategy and task, on accelerate.

Same seed, same data order, same step budget and the same evaluation for every strategy:
that is what makes the numbers of a comparison comparable.
"""

from __future__ import annotations

import itertools
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from peftkit.step import distributed as dist
from peftkit.step import bucket, flops, measure, memory, offload, packing
from peftkit import hardware
from peftkit.training import result as R
from peftkit.model.build import Built
from peftkit.step.optim import make_optimizer
from peftkit.training.checkpoint import Checkpointer
from peftkit.errors import UserError
from peftkit.io import atomic_write_json, save_safetensors
from peftkit.log import Progress, RunLog, warn
from peftkit.training.nonfinite import NonFiniteGuard
from peftkit.training.state import TrainState
from peftkit.training.progress import live_stats
from peftkit.strategies import cast_frozen, count_params
from peftkit.tasks import forgetting
from peftkit.tasks.data import columns
from peftkit.training.tracking import Tracking

SCHEMA = R.SCHEMA
# A search rung (train.stop_at) only yields a validation score; its selected setting's final run
# (a fresh process) estimates and measures memory. A rung therefore skips the estimate (it does
# not depend on the learning rate; two fake-tensor traces cost ~1.5 s, a quarter of a quickstart
# trial's training), the live-memory probe step (~0.75 s for full fine-tuning) and the weights
# file (the checkpoint has them; 87 MB for full).
RUNG_ESTIMATE = {"skipped": "a search rung (train.stop_at): the final run of the selected setting has the estimate"}


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


@dataclass
class Run:
    """Everything one ``fit`` works with, made by ``Trainer._setup``."""

    built: Built
    acc: object
    data: dict
    train: object  # the train split
    total: int  # optimizer steps of this run
    model: torch.nn.Module  # prepared (wrapped) model
    opt: object
    sched: object
    ck: Checkpointer
    guard: NonFiniteGuard
    timer: measure.StepTimer
    counter: object  # FLOP counter or None
    probe: memory.StepPeak  # live memory peak of one step after warm-up
    estimate: dict
    params: tuple[int, int]  # (trainable, total), before FSDP/ZeRO shard them
    frozen_cast: dict | None  # frozen weights stored in the autocast dtype (model.frozen_dtype), or None
    state: TrainState = field(default_factory=TrainState)
    resumed_from: int | None = None
    times: dict = field(default_factory=dict)  # load_s, data_s, estimate_s, train_s, eval_s
    t_start: float = 0.0  # before the data was read (wall_s counts from here, plus loading)


class Trainer:
    def __init__(self, built: Built, run_dir: str | Path, resume: bool = False):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.b = built
        self.model = built.model  # the unwrapped model (trained in place by fit)
        self.tc = built.recipe.train
        self.run_dir = Path(run_dir)
        self.resume = resume  # continue from the run dir's latest intact checkpoint, if any
        self.precision = hardware.for_run(built.recipe, warn)  # auto -> bf16/fp16/fp32 for this machine
        self.tc = self.tc.model_copy(update={"precision": self.precision.resolved})
        self.track = Tracking(built.recipe, self.run_dir)  # experiment trackers (output.report_to)
        self.acc = Accelerator(
            **self.track.accelerator_kwargs(),
            mixed_precision=self.precision.mixed_precision,
            gradient_accumulation_plugin=dist.accumulation_plugin(self.tc.grad_accum),
            cpu=not torch.cuda.is_available(),  # torchrun on CPU: gloo DDP only when accelerate is told
            dataloader_config=dist.dataloader_config(),
        )
        self.acc.print(f"[peftkit] {self.precision.line()}")
        if self.tc.activation_offloading and self.acc.device.type != "cuda":
            raise UserError(f"train.activation_offloading: needs a CUDA device (it moves saved activations from GPU "
                            f"to host memory); this run trains on {self.acc.device.type}")
        set_seed(self.tc.seed)
        dist.check_batch_size(self.tc.batch_size, self.acc.num_processes)
        if note := dist.requested_but_not_used(self.acc):
            self.acc.print(f"[peftkit] note: {note}")
        self.log = RunLog(None)

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
            return length_grouped_batches(columns(ds, ["length"])["length"], self.tc.batch_size, seed)
        return shuffled_batches(len(ds), self.tc.batch_size, seed)

    def epoch_batches(self, ds, epoch: int) -> tuple[list[list[int]], list[list[int]]]:
        """(global batches trained in ``epoch``, this rank's share of each); never empty."""
        world = self.acc.num_processes
        kept, local = dist.train_shards(self.train_batches(ds, epoch), self.acc.process_index, world)
        if not kept:
            why = (f"fewer than the {world} processes, so every global batch would be dropped; "
                   "use fewer processes or more data" if len(ds) < world else "no batch to train on")
            raise UserError(f"task.data: the train split has {len(ds)} example(s): {why}")
        return kept, local

    def bucket_multiple(self) -> int | None:
        """Training batches' padded length is rounded up to this (None: dynamic padding)."""
        m = self.tc.pad_to_multiple_of
        return m if m is not None else (16 if self.tc.compile else None)

    def eval_batches(self, ds) -> list[list[int]]:
        # Sorted by length: eval order does not change metrics, and padding costs time.
        lengths = columns(ds, ["length"])["length"]
        order = sorted(range(len(ds)), key=lengths.__getitem__)
        bs = self.tc.batch_size * 2
        return [order[k : k + bs] for k in range(0, len(order), bs)]

    # -- evaluation -----------------------------------------------------------------------
    def evaluate(self, model, ds) -> dict:
        shards, keep = dist.eval_shards(self.eval_batches(ds), self.acc.process_index, self.acc.num_processes)
        loader = dist.device_loader(self._loader(ds, shards), self.acc.device)
        model.eval()
        items = []
        t0 = time.perf_counter()
        with torch.no_grad(), self.acc.autocast():
            for idx, k, batch in zip(shards, keep, loader):
                p, r, loss = self.b.task.eval_outputs(model, batch)
                if k:
                    items += zip(idx, p, r, loss or [None] * len(p))
        # Every example once, in dataset order, whatever the number of processes.
        items = dist.gather_sorted(self.acc, items)
        preds, refs = [x[1] for x in items], [x[2] for x in items]
        losses = [x[3] for x in items if x[3] is not None]
        dt = time.perf_counter() - t0
        model.train()
        self.predictions = {"predictions": preds, "references": refs}  # per example, for paired bootstraps
        m = self.b.task.metrics(preds, refs)
        if losses and "loss" not in m:
            m["loss"] = sum(losses) / len(losses)
        m["examples"] = len(refs)
        m["eval_s"] = dt
        m["eval_samples_per_s"] = len(refs) / dt if dt else None
        return m

    # -- training -------------------------------------------------------------------------
    def fit(self) -> dict:
        run = self._setup()
        st, t_train = run.state, time.perf_counter()
        progress = Progress(run.total, enabled=self.tc.progress and self.acc.is_main_process)
        stop = self.tc.stop_step(run.total)  # < total: a search rung, checkpointed where it stops
        with measure.PeakRSS() as rss, progress as bar, run.ck.signals:
            while st.step < stop:
                batches, sizes = self._epoch(run)
                for n in sizes:
                    self._step(run, batches, n)
                    self._after_step(run, bar)
                    if st.step >= stop:
                        break
                else:
                    next(batches, None)  # the loader's end: accelerate forgets it
                if st.step == stop < run.total and not (run.ck.root / f"step-{st.step:08d}").exists():
                    run.ck.save(st)  # before the epoch advances: the continuation resumes exactly here
                st.next_epoch()
        run.times["train_s"] = time.perf_counter() - t_train
        return self._finish(run, rss)

    def _setup(self) -> Run:
        """Data, the run directory (resume or not), the log, then model, optimizer and meters."""
        b, tc, acc = self.b, self.tc, self.acc
        t_start = time.perf_counter()
        data = b.task.datasets()
        data_s = time.perf_counter() - t_start
        for note in b.task.notes():  # truncation, skipped bad rows
            warn(note)
        ck = Checkpointer(acc, self.run_dir, b.recipe, self.resume)
        resumed = ck.begin()
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.track.start(acc)
            self.log = RunLog(self.run_dir / "log.jsonl", self.track)
        train = data["train"]
        steps_per_epoch = math.ceil(math.ceil(len(train) / tc.batch_size) / tc.grad_accum)
        total = tc.max_steps if tc.max_steps is not None else max(1, math.ceil(steps_per_epoch * tc.epochs))
        run = self._prepare(data, total, ck)
        run.t_start, run.times = t_start, {"load_s": b.load_s, "data_s": data_s, **run.times}
        if resumed is not None:  # after prepare: RNG, optimizer and scheduler as they were at that step
            ck.restore(run.state)
            run.guard.skips, run.resumed_from = run.state.nonfinite_skips, resumed.step
            self.log(event="resumed", step=run.state.step, checkpoint=resumed.path.name)
        # measure one step after warm-up (not in a search rung: see RUNG_ESTIMATE)
        run.probe.at = 0 if tc.stop_step(total) < total else min(total, run.state.step + 2)
        self.forgetting = forgetting.before(b.task, run.model, self.run_dir, resumed is not None, acc.autocast, acc.is_main_process)
        run.model.train()
        return run

    def _prepare(self, data: dict, total: int, ck: Checkpointer) -> Run:
        b, tc, acc = self.b, self.tc, self.acc
        frozen, cast = hardware.frozen_dtype(b.recipe), None
        if frozen is not None and not dist.sharded(acc):  # FSDP/ZeRO flatten a unit in one dtype
            cast = {"dtype": str(frozen).removeprefix("torch."), "bytes_saved": cast_frozen(self.model, frozen)}
        params = count_params(self.model)  # before FSDP/ZeRO shard the parameters
        opt = make_optimizer(self.model, tc)
        from transformers import get_scheduler

        sched = get_scheduler(tc.scheduler, opt, num_warmup_steps=int(tc.warmup_ratio * total), num_training_steps=total)
        dist.prepare_deepspeed(acc, tc)
        model, opt, sched = dist.prepare(acc, self.model, opt, sched)
        if tc.compile:
            model = torch.compile(model)
        t_est = time.perf_counter()
        est = self._estimate(data["train"], total)
        estimate_s = time.perf_counter() - t_est
        acc.print(f"[peftkit] {b.strategy.name}: trainable {params[0]:,} / {params[1]:,} params "
                  f"({100 * params[0] / params[1]:.2f}%)")
        counter = _flop_counter(acc.unwrap_model(model)) if not tc.compile else None
        measure.cuda_reset()
        ck.attach(model, b.strategy, opt, sched, self.log)
        return Run(built=b, acc=acc, data=data, train=data["train"], total=total, model=model, opt=opt,
                   sched=sched, ck=ck, guard=NonFiniteGuard(tc.nonfinite, tc.max_nonfinite_skips, acc.scaler, warn),
                   timer=measure.StepTimer(warmup=min(3, max(0, total // 5))), counter=counter,
                   probe=memory.StepPeak(at=0), estimate=est, params=params, frozen_cast=cast,
                   times={"estimate_s": estimate_s})

    def _epoch(self, run: Run):
        """(iterator of (micro-batch, loss weight) from the data position on, sizes of its steps)."""
        st, tc = run.state, self.tc
        global_batches, local = self.epoch_batches(run.train, st.epoch)
        # A resume skips the batches this epoch already used (the data position).
        global_batches, local = global_batches[st.position:], local[st.position:]
        world = self.acc.num_processes
        weights = [dist.loss_weight(len(s), len(g), world) for g, s in zip(global_batches, local)]
        collate = packing.PaddingFree() if tc.padding_free else None
        if (m := self.bucket_multiple()) and not tc.padding_free:
            collate = bucket.PadToMultiple(self.b.task.collate, m, self.b.tokenizer.pad_token_id,
                                           self.b.recipe.task.max_length)
        loader = dist.device_loader(self._loader(run.train, local, collate), self.acc.device) if local else []
        n = len(local)
        # The last step of an epoch takes what is left (a short group; accelerate syncs at the loader's end).
        sizes = [min(tc.grad_accum, n - k) for k in range(0, n, tc.grad_accum)]
        return zip(loader, weights), sizes

    def _step(self, run: Run, batches, n: int) -> None:
        """One optimizer step over the next ``n`` micro-batches (fetched one at a time, so
        accelerate's ``sync_gradients`` is true on the last: the end of the group or of the loader)."""
        st, acc, model = run.state, self.acc, run.model
        group_scale = self.tc.grad_accum / n  # the gradient is the group's mean, also for a short group
        loss_sum, samples, tokens, ok = 0.0, 0, 0, True
        first = next(batches)
        with run.timer.step(), self.measure_step(run, memory.batch_shape(first[0])):
            for i, (batch, w) in enumerate(itertools.chain([first], itertools.islice(batches, n - 1))):
                with acc.accumulate(model):
                    with offload.hooks() if self.tc.activation_offloading else nullcontext():
                        loss = self.b.task.train_loss(model, batch)
                    s = w * group_scale
                    acc.backward(loss if s == 1.0 else loss * s)
                    loss_sum += loss.detach().float().item() * w
                    c = packing.batch_counts(batch)
                    samples, tokens = samples + c[0], tokens + c[1]
                    if acc.sync_gradients != (i == n - 1):
                        raise RuntimeError(f"internal: accelerate syncs at micro-batch {i + 1} of {n}")
                    if acc.sync_gradients:
                        ok = self._optimizer_step(run, loss_sum)
        run.timer.add_counts(*map(int, dist.reduce_sum(acc, [samples, tokens])))
        if run.counter is not None:
            run.timer.add_flops(run.counter.take())
        st.step, st.position = st.step + 1, st.position + n
        loss_sum = dist.reduce_sum(acc, [loss_sum])[0] / acc.num_processes
        if ok:
            st.losses.append(loss_sum / n)
        else:
            self.log(step=st.step, epoch=st.epoch, nonfinite_skipped=run.guard.skips)
        st.nonfinite_skips = run.guard.skips

    def _optimizer_step(self, run: Run, loss_sum: float) -> bool:
        """Clip, check for NaN/Inf, step optimizer and scheduler; False if the step was skipped."""
        tc, model = self.tc, run.model
        norm = self.acc.clip_grad_norm_(model.parameters(), tc.max_grad_norm) if tc.max_grad_norm else None
        ok = run.guard.step_ok(loss_sum, norm, model, run.state.step + 1)
        if ok:
            run.opt.step()
            run.sched.step()
        run.opt.zero_grad(set_to_none=True)
        return ok

    def measure_step(self, run: Run, shape):
        """Around one whole optimizer step (forward, backward, step): the live memory peak."""
        return run.probe.around(run.state.step + 1, run.model, run.opt, shape)

    def _after_step(self, run: Run, bar) -> None:
        """Log, evaluate and checkpoint when due."""
        st, tc = run.state, self.tc
        if st.step % tc.log_every == 0 or st.step == run.total:
            window = st.losses[-tc.log_every:] or [float("nan")]
            self.log(step=st.step, epoch=st.epoch, loss=sum(window) / len(window), lr=run.sched.get_last_lr()[0],
                     **live_stats(run.timer, run.total))  # for compare's live progress lines
        bar.update(st.step, st.losses[-1] if st.losses else float("nan"), run.timer)
        if tc.eval_every and st.step % tc.eval_every == 0 and st.step < run.total:
            m = self.evaluate(run.model, run.data["validation"])
            st.history.append({"step": st.step, **m})
            self.log(step=st.step, eval=m)
        run.ck.step_end(st)

    def _finish(self, run: Run, rss) -> dict:
        """Final evaluation, weights and result.json (main process); the result on every process."""
        if run.counter is not None:
            run.counter.close()
            run.timer.flops = dist.reduce_sum(self.acc, [run.timer.flops])[0]
        stopped = self.tc.stop_step(run.total) < run.total  # a search rung: validation only
        final = self.evaluate(run.model, run.data["validation" if stopped else self.tc.eval_split])
        run.times["eval_s"] = final.get("eval_s")
        self.log(step=run.state.step, eval_final=final)
        # A rung's weights are in its checkpoint (what the next rung resumes): no second copy.
        save = self.b.recipe.output.save_weights and not stopped
        sd = dist.strategy_state_dict(self.acc, run.model, self.b.strategy) if save else None
        self.model = self.acc.unwrap_model(run.model)
        wall_s = self.b.load_s + time.perf_counter() - run.t_start
        artifact = self._save_weights(sd) if self.acc.is_main_process else {}
        result = R.build(run, final, rss, wall_s, artifact, None if stopped else self._estimate_at(run.probe))
        result["forgetting"] = forgetting.after(self.forgetting, self.b.task, run.model, self.acc.autocast)
        if stopped:
            result["metrics"].update(eval_split="validation", stopped_at=run.state.step, total_steps=run.total)
        if self.acc.is_main_process:
            atomic_write_json(self.run_dir / "predictions.json", {"split": result["metrics"]["eval_split"],
                                                                  **self.predictions})
            atomic_write_json(self.run_dir / "result.json", result)
            self.log.close()
            self.track.finish([self.run_dir / "result.json"])
        self.acc.wait_for_everyone()
        return result

    def _save_weights(self, sd) -> dict:
        if sd is None:
            return {}
        path = self.run_dir / "strategy.safetensors"
        save_safetensors(path, sd)
        return {"strategy_weights": path.name, "strategy_bytes": path.stat().st_size, "tensors": len(sd)}

    def _estimate(self, train, total_steps: int) -> dict:
        """The memory estimate at the longest batch this run will train on (known up front)."""
        if self.tc.stop_step(total_steps) < total_steps:
            return dict(RUNG_ESTIMATE)
        lengths = columns(train, ["length"])["length"]
        need, longest, epoch = total_steps * self.tc.grad_accum, 0, 0
        while need > 0:  # every epoch has at least one batch (epoch_batches): this ends
            batches = self.epoch_batches(train, epoch)[0][:need]
            longest = max([longest, *(max(lengths[i] for i in b) for b in batches)])
            need, epoch = need - len(batches), epoch + 1
        return self._estimate_safe(batch_size=max(1, self.tc.batch_size // self.acc.num_processes),
                                   seq_len=bucket.round_up(longest, self.bucket_multiple(), self.b.recipe.task.max_length),
                                   seq_source="longest batch of this run")

    def _estimate_safe(self, **kw) -> dict:
        from peftkit.estimate.trace import estimate

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


def _flop_counter(model):
    """Model FLOPs per step for result.json (peftkit.step.flops); counting must never stop a run."""
    try:
        return flops.FlopCounter(model)
    except Exception as e:
        warn(f"model FLOPs are not counted: {e.__class__.__name__}: {e}")
        return None
