"""The executor contract and what every executor shares: one job in a fresh process, its records.

An executor takes :class:`~peftkit.runs.spec.Job` s (a training run, or a batch of search trials)
and decides only where and how many at once. Each job is one process whose argv is
``job.command(args)``; its output goes to ``job.dir/train.log``; a failure is written to
``job.dir/error.json``. A job that is already done is skipped (never submitted), so re-running
a comparison after a crash submits only what is missing; a run killed mid-way resumes from its
run directory's checkpoints when it runs again (the trainer does that by itself).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Sequence, get_args

from pydantic import Field

import peftkit
from peftkit.config import Section
from peftkit.io import atomic_write_json, die_with_parent
from peftkit.runs.spec import Job

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
# The directory holding the peftkit package: a job's process imports this checkout, wherever it runs.
PACKAGE_ROOT = str(Path(peftkit.__file__).resolve().parent.parent)
Launcher = Literal["none", "torchrun", "accelerate"]


class ExecutorConfig(Section):
    """The options every executor has: the ``executor:`` section of a compare recipe (CLI flags
    override it). An executor's own ``Config`` subclasses it with ``name: Literal["<name>"]``."""

    name: str
    parallel: int = Field(1, ge=1)  # runs at once (slurm: array parallelism; ray: in-flight tasks)
    gpus_per_run: int | None = Field(None, ge=0)  # default: local: the GPUs split over `parallel`; else 0
    cpus_per_run: int | None = Field(None, ge=1)  # default: local: the CPUs split over `parallel`; else 1
    launcher: Launcher = "none"  # a run over several GPUs (peftkit train --launcher)
    nproc: int = Field(1, ge=1)
    accelerate_config: str | None = None
    timeout_s: float | None = Field(None, gt=0)  # per run

    # `peftkit compare` flags for options (field -> argparse keywords); an executor adds its own.
    FLAGS: ClassVar[dict[str, dict[str, Any]]] = {
        "parallel": {"type": int, "help": "runs at once (local: each gets its share of CPUs or its own GPUs)"},
        "gpus_per_run": {"type": int, "help": "GPUs per run (local default: the visible GPUs / --parallel)"},
        "cpus_per_run": {"type": int, "help": "CPU threads per run"},
        "launcher": {"choices": list(get_args(Launcher)), "help": "each run over --nproc processes"},
        "nproc": {"type": int, "help": "processes per run for --launcher"},
        "accelerate_config": {"help": "accelerate config file for --launcher accelerate"},
    }


@dataclass
class Outcome:
    label: str
    dir: Path
    status: str  # "done" | "failed" | "skipped"
    seconds: float
    where: str
    error: dict | None

    def to_dict(self) -> dict:
        return {**asdict(self), "dir": str(self.dir)}


class Executor(ABC):
    """Runs jobs somewhere. Adding one: a module with a subclass (``name``, a typed ``Config``,
    ``run``) and one line in ``peftkit.runs.executors.REGISTRY``."""

    name: ClassVar[str]
    Config: ClassVar[type[ExecutorConfig]]

    def __init__(self, cfg: ExecutorConfig):
        self.cfg = cfg

    @abstractmethod
    def run(self, jobs: Sequence[Job], echo=print) -> list[Outcome]:
        """Every job not yet done, each one process of ``job.command(train_args(cfg))`` (use
        :func:`execute`); one Outcome per job, in order (the done ones ``skipped``, see :func:`pending`)."""


# -- one job, in a fresh process (runs wherever the executor put it) ---------------------------
_CHILD: list[subprocess.Popen] = []  # the training process of this worker, for a preemption signal


def train_args(cfg: ExecutorConfig) -> list[str]:
    """The ``peftkit train`` options a run takes from the executor's config (a multi-process launcher)."""
    if cfg.launcher == "none":
        return []
    extra = ["--launcher", cfg.launcher, "--nproc", str(cfg.nproc)]
    if cfg.accelerate_config:
        extra += ["--accelerate-config", str(Path(cfg.accelerate_config).resolve())]
    return extra


def log_tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")[-n:]
    except OSError:
        return ""


def _ignore_preempt_signal() -> None:
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def spawn(cmd: list[str], log, env: dict, shielded: bool) -> subprocess.Popen:
    """Start a job's process, its output into the open file ``log``. ``shielded``: it ignores SIGUSR2."""
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                            preexec_fn=die_with_parent(_ignore_preempt_signal if shielded else None))


def execute(job: Job, timeout: float | None = None, env: dict | None = None, args: Sequence[str] = (),
            shielded: bool = False) -> dict:
    """Run one job in a fresh process: {"status", "seconds", "host", "error"} (error also in error.json).

    ``shielded``: the process ignores SIGUSR2, SLURM's (submitit's) preemption warning sent to every
    process of the job; the worker answers it with a SIGTERM, on which the trainer checkpoints.
    """
    job.dir.mkdir(parents=True, exist_ok=True)
    for stale in ("result.json", "error.json"):
        (job.dir / stale).unlink(missing_ok=True)
    cmd = job.command(args)
    if timeout is not None:
        timeout *= job.runs_in_process
    full_env = {**os.environ, **(env or {}), "PYTHONPATH": PACKAGE_ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    log = job.dir / "train.log"
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        p = spawn(cmd, f, full_env, shielded)
        _CHILD.append(p)
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            rc = "timeout"
        finally:
            _CHILD.remove(p)
    seconds = round(time.perf_counter() - t0, 1)
    host = socket.gethostname()
    if rc == 0 and job.done():
        return {"status": "done", "seconds": seconds, "host": host, "error": None}
    err = error_record(job, rc, seconds, cmd, log)
    return {"status": "failed", "seconds": seconds, "host": host, "error": err}


def error_record(job: Job, rc, seconds: float, cmd: list[str], log: Path) -> dict:
    """A failed job's error.json (written): exit state, command, the log's tail; message = its last line."""
    err = {**job.identity(), "returncode": rc, "seconds": seconds, "host": socket.gethostname(), "command": cmd,
           "log_tail": log_tail(log)}
    lines = [x for x in err["log_tail"].splitlines() if x.strip()]
    err["message"] = lines[-1] if lines else f"exit code {rc}"
    atomic_write_json(job.dir / "error.json", err)
    return err


def _exited(p: subprocess.Popen) -> bool:
    # Without reaping: stop_child runs in a signal handler while execute's p.wait() holds Popen's lock.
    try:
        return os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def stop_child(grace_s: float = 120.0) -> None:
    """Preempted: SIGTERM to the training process, which writes a checkpoint and exits; wait for it."""
    for p in list(_CHILD):
        p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while not _exited(p) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not _exited(p):
            p.kill()


# -- bookkeeping every executor shares --------------------------------------------------------
def label(i: int, n: int, job: Job) -> str:
    return f"[{i}/{n}] {job.title}"


def pending(jobs: Sequence[Job], echo) -> tuple[list[Outcome | None], list[int]]:
    """Outcomes with the done jobs filled in as skipped, and the indices still to run."""
    outs: list[Outcome | None] = [None] * len(jobs)
    todo = []
    for i, job in enumerate(jobs):
        if job.done():
            lab = label(i + 1, len(jobs), job)
            outs[i] = Outcome(lab, job.dir, "skipped", 0.0, "-", None)
            echo(f"{lab}: up to date, skipped ({job.dir})")
        else:
            todo.append(i)
    return outs, todo


def finish(lab: str, job: Job, rep: dict, where: str, echo) -> Outcome:
    out = Outcome(lab, job.dir, rep["status"], rep["seconds"], where, rep["error"])
    if out.status == "done":
        echo(f"{lab}: done in {out.seconds:.0f} s on {where}")
    else:
        echo(f"{lab}: FAILED in {out.seconds:.0f} s on {where} ({rep['error']['message']}); "
             f"details in {job.dir / 'error.json'}")
    return out


def failed_report(job: Job, message: str, seconds: float = 0.0) -> dict:
    """A job whose worker died before reporting (the engine's error), also written as error.json."""
    err = {**job.identity(), "returncode": None, "seconds": seconds, "message": message}
    job.dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(job.dir / "error.json", err)
    return {"status": "failed", "seconds": seconds, "host": "?", "error": err}


def summary(outcomes: Sequence[Outcome], results: Sequence[str] | None = None) -> str:
    """One table: run, exit state, where, how long (and each run's result, when given)."""
    results = results or [""] * len(outcomes)
    rows = [("run", "status", "where", "seconds", "result")] + [
        (o.label, o.status, o.where, "-" if o.status == "skipped" else f"{o.seconds:.0f}", res)
        for o, res in zip(outcomes, results)]
    w = [max(len(r[k]) for r in rows) for k in range(5)]
    return "\n".join("  ".join(c.ljust(w[k]) for k, c in enumerate(r)).rstrip() for r in rows)
