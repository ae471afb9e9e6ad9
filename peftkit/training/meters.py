"""Everything a run measures, behind one object, so that the loop does not know what is measured.

- before training: the memory estimate at the longest batch the run will train on;
- around each step: the step timer, real-token counts, model FLOPs (``peftkit.step.flops``) and,
  on one step after warm-up, the live-memory probe (``peftkit.step.memory.StepPeak``);
  no device sync on a steady step: times and counts are read every ``train.log_every`` steps
  (``read``). The measurement steps (the FLOP counter's first step, which runs its per-layer
  hooks, and the probe step, which tracks every storage and syncs) are kept out of ``speed``;
- around the whole loop: the process's peak RSS;
- after training: the estimate again at the probed step's batch shape (like with like), then
  the ``memory`` and ``speed`` sections of result.json (``record``).
"""

from __future__ import annotations

import itertools
import time
from contextlib import contextmanager

import torch

from peftkit.log import warn
from peftkit.step import distributed as dist
from peftkit.step import flops, measure, memory, packing

# A search rung (train.stop_at) only yields a validation score; its selected setting's final run
# (a fresh process) estimates and measures memory. A rung therefore skips the estimate (it does
# not depend on the learning rate; two fake-tensor traces cost ~1.5 s, a quarter of a quickstart
# trial's training) and the live-memory probe step (~0.75 s for full fine-tuning).
RUNG_ESTIMATE = {"skipped": "a search rung (train.stop_at): the final run of the selected setting has the estimate"}


class Meters:
    def __init__(self, built, tc, acc, plan, rung: bool):
        self.b, self.tc, self.acc, self.plan, self.rung = built, tc, acc, plan, rung
        self.estimate, self.estimate_s, self.counter = {}, 0.0, None
        self.timer = measure.StepTimer(warmup=0)
        self.probe = memory.StepPeak(at=0 if rung else None)  # None: chosen at the first step
        self.rss = None
        self._samples = self._tokens = 0
        self.first_step: int | None = None

    # -- before training ------------------------------------------------------------------
    def setup(self, model, train, total: int) -> None:
        """The estimate (before any step), the FLOP counter and the step timer's warm-up."""
        t0 = time.perf_counter()
        self.estimate = dict(RUNG_ESTIMATE) if self.rung else self._estimate(
            batch_size=max(1, self.tc.batch_size // self.acc.num_processes),
            seq_len=self.plan.longest_seq(train, total), seq_source="longest batch of this run")
        self.estimate_s = time.perf_counter() - t0
        self.total = total
        self.counter = _flop_counter(self.acc.unwrap_model(model)) if not self.tc.compile else None
        reduce = None if self.acc.num_processes == 1 else (lambda t: self.acc.reduce(t, reduction="sum"))
        self.timer = measure.StepTimer(warmup=min(3, max(0, total // 5)), reduce=reduce)
        measure.cuda_reset()

    @contextmanager
    def training(self):
        """Around the whole loop: the process's peak RSS over what loading left."""
        with measure.PeakRSS() as self.rss:
            yield

    # -- each step ------------------------------------------------------------------------
    @contextmanager
    def around_step(self, step: int, model, opt, first_batch: dict):
        """Around one whole optimizer step (forward, backward, optimizer step)."""
        if self.first_step is None:  # this process's first step (after a resume: not step 1)
            self.first_step = step
            if self.probe.at is None:  # one step after warm-up: this process's second step
                self.probe.at = min(self.total, step + 1)
            self.timer.excluded = {s: k for s, k in ((step, "flops" if self.counter else None),
                                                     (self.probe.at, "probe")) if k and s}
        with self.timer.step(step) as rec, self.probe.around(step, model, opt, memory.batch_shape(first_batch)):
            yield
        self.timer.add_counts(self._samples, self._tokens)
        self._samples = self._tokens = 0
        if self.counter is not None and rec.kind != "steady":
            taken = self.counter.take()  # not in speed; its sync falls outside the steady steps
            if rec.kind == "flops":
                self.timer.flops_step = [taken, rec]

    def count(self, batch: dict) -> None:
        """Sequences and real tokens of one micro-batch of the current step (kept on the device)."""
        s, t = device_counts(batch)
        self._samples, self._tokens = self._samples + s, self._tokens + t

    def read(self) -> dict[int, measure.Step]:
        """The steps since the last read, on the host (one sync): step -> times and counts."""
        steps = self.timer.read()
        if self.counter is not None and steps:
            self.timer.add_flops(self.counter.take())  # the steady steps' FLOPs since the last read
        return {s.step: s for s in steps}

    def tokens_since(self, step: int) -> int:
        """Real tokens (all processes) of the steps after ``step`` read so far."""
        return sum(s.tokens for s in itertools.takewhile(lambda s: s.step > step, reversed(self.timer.steps)))

    def live(self) -> dict:
        """What a periodic log record carries for compare's live display (and the trackers)."""
        from peftkit.training.progress import live_stats

        return live_stats(self.timer, self.total)

    # -- after training -------------------------------------------------------------------
    def record(self) -> dict:
        """{"memory": ..., "speed": ...} sections of result.json (speed: the meters' part)."""
        self.read()
        if self.counter is not None:
            self.counter.close()
            self.timer.flops = dist.reduce_sum(self.acc, [self.timer.flops])[0]
            if self.timer.flops_step is not None:  # every process counted its own share
                self.timer.flops_step[0] = dist.reduce_sum(self.acc, [self.timer.flops_step[0]])[0]
        rss = self.rss
        measured = {"method": "cuda" if torch.cuda.is_available() else "cpu_rss",
                    "rss_baseline_bytes": rss.baseline, "rss_peak_bytes": rss.peak,
                    "peak_bytes": rss.peak - rss.baseline, **measure.cuda_peaks()}
        if torch.cuda.is_available():
            measured["peak_bytes"] = measured["max_allocated_bytes"]
        measured = dist.gather_memory(self.acc, measured)
        at_measured = None if self.rung else self._estimate_at_probe()
        return {"memory": memory.section(self.estimate, self.probe.result, measured, at_measured),
                "speed": {**self.timer.summary(), "estimate_s": self.estimate_s}}

    def _estimate_at_probe(self) -> dict | None:
        """The estimate at the measured step's batch shape, to compare like with like."""
        shape = (self.probe.result or {}).get("batch_shape")
        if not shape or self.tc.padding_free:
            return None
        return self._estimate(batch_size=shape[0], seq_len=shape[1], seq_source="the measured step's batch")

    def _estimate(self, **kw) -> dict:
        from peftkit.estimate.trace import estimate

        try:
            return estimate(self.b.recipe, task=self.b.task, tokenizer=self.b.tokenizer, accum=self.tc.grad_accum,
                            device="cuda" if torch.cuda.is_available() else "cpu", **kw)
        except Exception as e:  # an estimate must never stop a training run
            return {"error": f"{e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}"}


def device_counts(batch: dict) -> tuple:
    """(sequences, real tokens) of a padded or padding-free batch, as ``packing.batch_counts``
    counts them, but left on the device (``int()`` of a CUDA tensor waits for the GPU)."""
    if "attention_mask" in batch:
        return int(batch["input_ids"].shape[0]), batch["attention_mask"].sum()
    if "position_ids" in batch:
        return (batch["position_ids"] == 0).sum(), int(batch["position_ids"].numel())
    return packing.batch_counts(batch)  # shapes only: no device read


def _flop_counter(model):
    """Model FLOPs per step for result.json (peftkit.step.flops); counting must never stop a run."""
    try:
        return flops.FlopCounter(model)
    except Exception as e:
        warn(f"model FLOPs are not counted: {e.__class__.__name__}: {e}")
        return None
