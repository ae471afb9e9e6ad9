"""The one training loop, for every strategy and task, on accelerate.

Same seed, same data order, same step budget and the same evaluation for every strategy:
that is what makes the numbers of a comparison comparable. This file is the recipe, as in
torchtune: setup -> train -> finish over a typed ``Run``. What happens before the loop is in
``setup``, the evaluation loop in ``evaluation``, what the batches are in ``batches``, what
is measured in ``meters``, what result.json holds in ``result``.
"""

from __future__ import annotations

import itertools
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from peftkit.log import Progress, RunLog, warn
from peftkit.step import distributed as dist, kernels, offload
from peftkit.tasks import forgetting
from peftkit.training import batches, evaluation, result, setup
from peftkit.training import lock as run_lock
from peftkit.training.checkpoint import Checkpointer
from peftkit.training.state import Run, StepValues, read_values


class Trainer:
    def __init__(self, built, run_dir: str | Path, resume: bool = False):
        self.b, self.run_dir = built, Path(run_dir)
        self.resume = resume  # continue from the run dir's latest intact checkpoint, if any
        m = setup.machine(built, self.run_dir)  # prints the run's first lines (precision first)
        self.precision, self.tc, self.micro, self.track, self.acc = m.precision, m.tc, m.micro, m.track, m.acc
        self.model, self.kernels = m.model, m.kernels  # the unwrapped model (trained in place by fit)
        self.log = RunLog(None)  # no file before the run dir is ours (fit's setup)
        self.plan = batches.Plan(built, self.tc, self.acc, order=self.train_batches)

    def train_batches(self, ds, epoch: int) -> list[list[int]]:
        """An epoch's global batches (here, not only in ``batches``, so a test can plant an order)."""
        return batches.train_batches(ds, self.tc, epoch)

    def evaluate(self, model, ds) -> tuple[dict, dict]:
        """(metrics, per-example predictions and references); a method so a test can wrap it."""
        return evaluation.evaluate(self.b.task, self.plan, self.acc, model, ds)

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
        b, acc = self.b, self.acc
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
        total = setup.total_steps(len(data["train"]), self.tc)
        run = setup.prepare(b, self.tc, acc, self.plan, self.model, data, total, ck, self.log)
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
            micro_batch=self.micro.as_dict() if self.micro else None, kernels=kernels.report(self.kernels),
            forgetting=forgetting.after(self.forgetting, self.b.task, run.model, self.acc.autocast)))
        if self.acc.is_main_process:
            result.write(self.run_dir, res, predictions)
            self.log.close()
            self.track.finish([self.run_dir / "result.json"])
        self.acc.wait_for_everyone()
        return res
