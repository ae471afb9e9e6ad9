"""The one training loop, for every strategy and task, on accelerate.

Same seed, same data order, same step budget and the same evaluation for every strategy:
that is what makes the numbers of a comparison comparable. What the batches are lives in
``batches``, what is measured in ``meters``, what result.json holds in ``result``: this file
is only setup -> train -> finish over a ``Run``.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from peftkit import hardware
from peftkit.errors import UserError
from peftkit.estimate.fit import resolve_micro_batch
from peftkit.log import Progress, RunLog, warn
from peftkit.model import backbone
from peftkit.step import distributed as dist, kernels, offload
from peftkit.step.optim import make_optimizer
from peftkit.strategies import cast_frozen, count_params
from peftkit.training import batches, result
from peftkit.training.checkpoint import Checkpointer
from peftkit.training.meters import Meters
from peftkit.training.nonfinite import NonFiniteGuard
from peftkit.training.state import Run, StepValues, read_values
from peftkit.tasks import forgetting
from peftkit.training.tracking import Tracking
from peftkit.training import lock as run_lock


class Trainer:
    def __init__(self, built, run_dir: str | Path, resume: bool = False):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.b = built
        self.model = built.model  # the unwrapped model (trained in place by fit)
        self.run_dir = Path(run_dir)
        self.resume = resume  # continue from the run dir's latest intact checkpoint, if any
        self.precision = hardware.for_run(built.recipe, warn)  # auto -> bf16/fp16/fp32 for this machine
        self.tc = built.recipe.train.model_copy(update={"precision": self.precision.resolved})
        # train.micro_batch_size: the global batch split into what fits this device (by the estimate)
        self.micro = resolve_micro_batch(built.recipe, world=int(os.environ.get("WORLD_SIZE", "1")),
                                         task=built.task, tokenizer=built.tokenizer)
        if self.micro:
            self.tc = self.tc.model_copy(update=self.micro.train_update())
        self.track = Tracking(built.recipe, self.run_dir)  # experiment trackers (output.report_to)
        self.acc = Accelerator(
            **self.track.accelerator_kwargs(),
            mixed_precision=self.precision.mixed_precision,
            gradient_accumulation_plugin=dist.accumulation_plugin(self.tc.grad_accum),
            cpu=not torch.cuda.is_available(),  # torchrun on CPU: gloo DDP only when accelerate is told
            dataloader_config=dist.dataloader_config(),
        )
        self.acc.print(f"[peftkit] {self.precision.line()}; {backbone.attention_line(built.backbone_info)}")
        if self.micro:
            self.acc.print(f"[peftkit] {self.micro.line()}")
        if self.tc.activation_offloading and self.acc.device.type != "cuda":
            raise UserError(f"train.activation_offloading: needs a CUDA device (it moves saved activations from GPU "
                            f"to host memory); this run trains on {self.acc.device.type}")
        set_seed(self.tc.seed)
        dist.check_batch_size(self.tc.batch_size, self.acc.num_processes)
        if note := dist.requested_but_not_used(self.acc):
            self.acc.print(f"[peftkit] note: {note}")
        self.log = RunLog(None)
        # Fused kernels / compiled blocks where they pay; padding-free where a varlen kernel runs it.
        self.model, self.kernels = kernels.apply(self.model, built.recipe, self.acc.device)
        self.tc = self.tc.model_copy(update={"padding_free": self.kernels["padding_free"]})
        self.plan = batches.Plan(built, self.tc, self.acc, order=self.train_batches)

    def train_batches(self, ds, epoch: int) -> list[list[int]]:
        """An epoch's global batches (here, not only in ``batches``, so a test can plant an order)."""
        return batches.train_batches(ds, self.tc, epoch)

    def evaluate(self, model, ds) -> tuple[dict, dict]:
        """(metrics, per-example predictions and references: for paired bootstraps)."""
        shards, keep, loader = self.plan.evaluation(ds)
        model.eval()
        items, t0 = [], time.perf_counter()
        with torch.no_grad(), self.acc.autocast():
            for idx, k, batch in zip(shards, keep, loader):
                p, r, loss = self.b.task.eval_outputs(model, batch)
                if k:
                    items += zip(idx, p, r, loss or [None] * len(p))
        items = dist.gather_sorted(self.acc, items)  # every example once, in dataset order, any world size
        dt = time.perf_counter() - t0
        model.train()
        preds, refs = [x[1] for x in items], [x[2] for x in items]
        losses = [x[3] for x in items if x[3] is not None]
        m = self.b.task.metrics(preds, refs)
        if losses and "loss" not in m:
            m["loss"] = sum(losses) / len(losses)
        m.update(examples=len(refs), eval_s=dt, eval_samples_per_s=len(refs) / dt if dt else None)
        return m, {"predictions": preds, "references": refs}

    # -- the run ------------------------------------------------------------------------------
    @run_lock.released_after  # the run dir's lock, taken in _setup
    def fit(self) -> dict:
        run = self._setup()
        progress = Progress(run.total, enabled=self.tc.progress and self.acc.is_main_process)
        with run.meters.training(), progress as bar, run.ck.signals:
            self._train(run, bar)
        return self._finish(run)

    def _setup(self) -> Run:
        """Data, the run directory (resume or not), the log, then model, optimizer and meters."""
        b, tc, acc = self.b, self.tc, self.acc
        t_start = time.perf_counter()
        data = b.task.datasets()
        data_s = time.perf_counter() - t_start
        for note in b.task.notes():  # truncation, skipped bad rows
            warn(note)
        # One writer per run dir, held for the run's life (the kernel drops it if this process dies).
        self.lock = run_lock.acquire(self.run_dir) if acc.is_main_process else None
        ck = Checkpointer(acc, self.run_dir, b.recipe, self.resume)
        resumed = ck.begin()
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.track.start(acc)
            self.log = RunLog(self.run_dir / "log.jsonl", self.track)
        steps_per_epoch = math.ceil(math.ceil(len(data["train"]) / tc.batch_size) / tc.grad_accum)
        total = tc.max_steps if tc.max_steps is not None else max(1, math.ceil(steps_per_epoch * tc.epochs))
        run = self._prepare(data, total, ck)
        run.t_start, run.times = t_start, {"load_s": b.load_s, "data_s": data_s}
        if resumed is not None:  # after prepare: RNG, optimizer and scheduler as they were at that step
            ck.restore(run.state)
            run.guard.skips, run.resumed_from = run.state.nonfinite_skips, resumed.step
            self.log(event="resumed", step=run.state.step, checkpoint=resumed.path.name)
        run.state.before_save = lambda: self._read(run)  # a checkpoint holds every step's loss
        self.forgetting = forgetting.before(b.task, run.model, self.run_dir, resumed is not None, acc.autocast,
                                            acc.is_main_process)
        run.model.train()
        return run

    def _prepare(self, data: dict, total: int, ck: Checkpointer) -> Run:
        """Model, optimizer and scheduler through accelerate; the meters' estimate before any step."""
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
        stop = tc.stop_step(total)
        meters = Meters(b, tc, acc, self.plan, rung=stop < total)
        meters.setup(model, data["train"], total)
        acc.print(f"[peftkit] {b.strategy.name}: trainable {params[0]:,} / {params[1]:,} params "
                  f"({100 * params[0] / params[1]:.2f}%)")
        ck.attach(model, b.strategy, opt, sched, self.log)
        guard = NonFiniteGuard(tc.nonfinite, tc.max_nonfinite_skips, acc.scaler, warn)
        return Run(data=data, total=total, stop=stop, model=model, opt=opt, sched=sched, ck=ck, guard=guard,
                   meters=meters, params=params, frozen_cast=cast, on_device=guard.on_device(opt))

    def _train(self, run: Run, bar) -> None:
        """Epochs of optimizer steps up to ``run.stop``. ``train_s``: all of it (every step, logs,
        checkpoints) but the evaluations during training, which are ``train_eval_s``."""
        st, t0 = run.state, time.perf_counter()
        run.times["train_eval_s"] = 0.0
        while st.step < run.stop:
            micro, sizes = self.plan.epoch(run.data["train"], st.epoch, st.position)
            for n in sizes:
                self._step(run, micro, n)
                self._after_step(run, bar)
                if st.step >= run.stop:
                    break
            else:
                next(micro, None)  # the loader's end: accelerate forgets it
            if st.step == run.stop and run.rung and not (run.ck.root / f"step-{st.step:08d}").exists():
                run.ck.save(st)  # before the epoch advances: the continuation resumes exactly here
            st.next_epoch()
        self._read(run)  # and what the device still had queued is done
        run.times["train_s"] = time.perf_counter() - t0 - run.times["train_eval_s"]

    def _step(self, run: Run, micro, n: int) -> None:
        """One optimizer step over the next ``n`` micro-batches (fetched one at a time, so
        accelerate's ``sync_gradients`` is true on the last: the end of the group or of the loader)."""
        st, acc, model = run.state, self.acc, run.model
        group_scale = self.tc.grad_accum / n  # the gradient is the group's mean, also for a short group
        # Kept on the device (float64: the same sum the host made of float32 losses); read with the
        # log, not per step: each read waits for the GPU, stalling the queue the host keeps ahead.
        loss_sum, norm, ok = torch.zeros((), dtype=torch.float64, device=acc.device), None, None
        first = next(micro)
        with run.meters.around_step(st.step + 1, model, run.opt, first[0]):
            for i, (batch, w) in enumerate(itertools.chain([first], itertools.islice(micro, n - 1))):
                with acc.accumulate(model):
                    with offload.hooks() if self.tc.activation_offloading else nullcontext():
                        loss = self.b.task.train_loss(model, batch)
                    s = w * group_scale
                    acc.backward(loss if s == 1.0 else loss * s)
                    loss_sum += loss.detach().float().double() * w
                    run.meters.count(batch)
                    if acc.sync_gradients != (i == n - 1):
                        raise RuntimeError(f"internal: accelerate syncs at micro-batch {i + 1} of {n}")
                    if acc.sync_gradients:
                        norm, ok, inc = self._optimizer_step(run, loss_sum)
        st.step, st.position = st.step + 1, st.position + n
        run.unread.append(StepValues(st.step, st.epoch, n, loss_sum, norm, ok, inc))

    def _optimizer_step(self, run: Run, loss_sum: torch.Tensor) -> tuple:
        """Clip, check for NaN/Inf, step optimizer and scheduler: (gradient norm, whether the
        step was taken: None when the device decided, scheduler increments)."""
        tc, model, guard, sched = self.tc, run.model, run.guard, getattr(run.sched, "scheduler", run.sched)
        norm = self.acc.clip_grad_norm_(model.parameters(), tc.max_grad_norm) if tc.max_grad_norm else None
        if run.on_device:  # the optimizer skips a non-finite step itself; counted when read
            norm, ok = guard.grad_norm(norm, model), None
            guard.mask(run.opt, loss_sum, norm)
        else:  # any other optimizer: a host read per step
            ok = guard.step_ok(float(loss_sum), norm, model, run.state.step + 1)
        before = sched.last_epoch
        if ok is not False:
            run.opt.step()
            run.sched.step()
        run.opt.zero_grad(set_to_none=True)
        return norm, ok, sched.last_epoch - before

    def _read(self, run: Run) -> None:
        """The steps since the last read, on the host at once: losses, skips, times, tokens."""
        st, counted = run.state, run.meters.read()
        for v in read_values(run.unread, self.acc):
            if ok := run.guard.settle(v, run.sched):
                st.losses.append(v["loss"])
            else:
                self.log(step=v["step"], epoch=v["epoch"], nonfinite_skipped=run.guard.skips)
            if self.tc.log_step_values:
                self.log(step=v["step"], step_loss=v["loss"], step_tokens=counted[v["step"]].tokens,
                         grad_norm=v["grad_norm"], skipped=not ok)
        run.unread.clear()
        st.nonfinite_skips = run.guard.skips

    def _after_step(self, run: Run, bar) -> None:
        """Log, evaluate and checkpoint when due."""
        st, tc, every = run.state, self.tc, run.ck.every
        log = st.step % tc.log_every == 0 or st.step == run.total
        evaluate = tc.eval_every and st.step % tc.eval_every == 0 and st.step < run.total
        if log or evaluate or (every and st.step % every == 0) or st.step == run.stop:
            self._read(run)  # the only device syncs of the loop (a checkpoint on a signal reads too)
        if log:
            window = st.losses[-tc.log_every:] or [float("nan")]
            self.log(step=st.step, epoch=st.epoch, loss=sum(window) / len(window), lr=run.sched.get_last_lr()[0],
                     tokens=run.meters.tokens_since(st.step - tc.log_every),
                     **run.meters.live())  # for compare's live progress lines
        bar.update(st.step, st.losses[-1] if st.losses else float("nan"), run.meters.timer)  # as of the last read
        if evaluate:
            m, _ = self.evaluate(run.model, run.data["validation"])
            run.times["train_eval_s"] += m["eval_s"]
            st.history.append({"step": st.step, **m})
            self.log(step=st.step, eval=m)
        run.ck.step_end(st)

    def _finish(self, run: Run) -> dict:
        """Final evaluation, weights and result.json (main process); the result on every process."""
        final, predictions = self.evaluate(run.model, run.data["validation" if run.rung else self.tc.eval_split])
        run.times["eval_s"] = final.get("eval_s")
        self.log(step=run.state.step, eval_final=final)
        # A rung's weights are in its checkpoint (what the next rung resumes): no second copy.
        save = self.b.recipe.output.save_weights and not run.rung
        sd = dist.strategy_state_dict(self.acc, run.model, self.b.strategy) if save else None
        self.model = self.acc.unwrap_model(run.model)
        wall_s = self.b.load_s + time.perf_counter() - run.t_start
        artifact = result.save_weights(self.run_dir, sd) if self.acc.is_main_process else {}
        res = result.build(result.Finished(
            built=self.b, acc=self.acc, params=run.params, frozen_cast=run.frozen_cast, state=run.state,
            train_examples=len(run.data["train"]), final=final, measured=run.meters.record(), times=run.times,
            wall_s=wall_s, artifact=artifact, resumed_from=run.resumed_from, rung_of=run.total if run.rung else None,
            micro_batch=self.micro.as_dict() if self.micro else None))
        res["run"]["kernels"] = kernels.report(self.kernels)
        res["forgetting"] = forgetting.after(self.forgetting, self.b.task, run.model, self.acc.autocast)
        if self.acc.is_main_process:
            result.write(self.run_dir, res, predictions)
            self.log.close()
            self.track.finish([self.run_dir / "result.json"])
        self.acc.wait_for_everyone()
        return res
