"""slurm: one SLURM job array through submitit; a preempted or timed-out job checkpoints and is requeued."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from peftkit.errors import UserError
from peftkit.runs.executors.base import Executor, ExecutorConfig, Outcome, execute, failed_report, finish, label, \
    pending, stop_child, train_args


class SlurmConfig(ExecutorConfig):
    name: Literal["slurm"] = "slurm"
    partition: str | None = None
    time_min: int = Field(24 * 60, ge=1)  # job time limit
    slurm: dict[str, Any] = {}  # further submitit parameters, e.g. {slurm_account: x, mem_gb: 32}
    cluster: str | None = None  # submitit's cluster: None = SLURM if available; "local" runs jobs here (tests)

    FLAGS: ClassVar[dict[str, dict[str, Any]]] = {"partition": {"help": "slurm partition"}}


def _submitit():
    try:
        import submitit
    except ImportError:
        raise UserError("--executor slurm needs submitit: pip install 'peftkit[cluster]'") from None
    return submitit


class TrainTask:
    """One job as a submitit job; on preemption/timeout the trainer checkpoints and the job is requeued.

    submitit requeues any callable with a ``checkpoint`` method (``submitit.helpers.Checkpointable``
    is that method and a check), so this module imports submitit only when it submits.
    """

    def __call__(self, job, timeout, env, args):
        import submitit

        return {**execute(job, timeout, env, args, shielded=True), "job_id": submitit.JobEnvironment().job_id}

    def checkpoint(self, *args, **kwargs):
        from submitit.helpers import DelayedSubmission

        stop_child()  # the run dir now holds a checkpoint; the requeued job resumes from it
        return DelayedSubmission(self, *args, **kwargs)


class SlurmExecutor(Executor):
    """a SLURM job array through submitit, requeued on preemption."""

    name = "slurm"
    Config = SlurmConfig

    def __init__(self, cfg: SlurmConfig):
        super().__init__(cfg)
        self.jobs: list = []  # submitted jobs (tests interrupt them to simulate a preemption)

    def executor(self, folder: Path):
        submitit = _submitit()
        c = self.cfg
        ex = submitit.AutoExecutor(folder=folder / "%j", cluster=c.cluster)
        params = {"timeout_min": c.time_min, "cpus_per_task": c.cpus_per_run or 1, "gpus_per_node": c.gpus_per_run or 0,
                  "name": "peftkit", "slurm_array_parallelism": c.parallel, **c.slurm}
        if c.partition:
            params["slurm_partition"] = c.partition
        ex.update_parameters(**params)
        return ex

    def run(self, jobs, echo=print) -> list[Outcome]:
        outs, todo = pending(jobs, echo)
        if not todo:
            return outs
        folder = jobs[todo[0]].dir.parents[1] / "_slurm"  # <out>/_slurm/<job id>/: submitit's logs per job
        ex = self.executor(folder)
        t0 = time.perf_counter()
        with ex.batch():
            submitted = [ex.submit(TrainTask(), jobs[i], self.cfg.timeout_s, {}, train_args(self.cfg)) for i in todo]
        self.jobs = submitted
        for i, sj in zip(todo, submitted):
            echo(f"{label(i + 1, len(jobs), jobs[i])}: submitted as job {sj.job_id} (logs: {folder / str(sj.job_id)})")
        for i, sj in zip(todo, submitted):
            try:
                rep = sj.result()
            except Exception as e:  # the job died outside peftkit train: node failure, cancelled, out of time
                msg = str(e).strip().splitlines()
                rep = failed_report(jobs[i], f"slurm job {sj.job_id}: {msg[-1] if msg else type(e).__name__}",
                                    round(time.perf_counter() - t0, 1))
            where = f"slurm:{sj.job_id} on {rep['host']}"
            outs[i] = finish(label(i + 1, len(jobs), jobs[i]), jobs[i], rep, where, echo)
        return outs
