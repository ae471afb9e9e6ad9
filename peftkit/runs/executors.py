"""Where the runs of a comparison (or a search) execute: a local pool, a SLURM job array, a Ray cluster.

One run is always the same thing: ``python -m peftkit train <dir>/../seedK.yaml --out <dir>``
in a fresh process, writing an ordinary run directory. An executor only decides where and
how many at once. A run that is already done is skipped (never submitted), so re-running a
comparison after a crash submits only what is missing; a run killed mid-way resumes from its
run directory's checkpoints when it runs again (the trainer does that by itself).
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, Sequence

from pydantic import Field, ValidationError

from peftkit.config import Section

from peftkit.errors import UserError
from peftkit.io import atomic_write_json, atomic_write_text, die_with_parent

try:  # optional (the cluster extra): only the slurm executor needs it
    from submitit.helpers import Checkpointable
except ImportError:
    Checkpointable = object



class Run(Protocol):
    """What an executor runs: compare's Run (a variant x seed with its recipe and run directory)."""
    variant: str
    seed: int
    recipe: Any
    dir: Path
    hash: str

    def done(self) -> bool: ...


NAMES = ("local", "slurm", "ray")
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


class ExecutorSection(Section):
    """The ``executor:`` section of a compare recipe (CLI flags override it)."""

    name: Literal["local", "slurm", "ray"] = "local"
    parallel: int = Field(1, ge=1)  # runs at once (slurm: array parallelism; ray: in-flight tasks)
    gpus_per_run: int | None = Field(None, ge=0)  # default: local: the GPUs split over `parallel`; else 0
    cpus_per_run: int | None = Field(None, ge=1)  # default: local: the CPUs split over `parallel`; else 1
    launcher: Literal["none", "torchrun", "accelerate"] = "none"  # a run over several GPUs (peftkit train --launcher)
    nproc: int = Field(1, ge=1)
    accelerate_config: str | None = None
    timeout_s: float | None = Field(None, gt=0)  # per run
    partition: str | None = None  # slurm
    time_min: int = Field(24 * 60, ge=1)  # slurm job time limit
    slurm: dict[str, Any] = {}  # further submitit parameters, e.g. {slurm_account: x, mem_gb: 32}
    cluster: str | None = None  # submitit's cluster: None = SLURM if available; "local" runs jobs here (tests)
    address: str | None = None  # ray: cluster address ("auto", "ray://host:10001"); None = a local instance


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


class Executor(Protocol):
    def run(self, runs: Sequence[Run], echo=print) -> list[Outcome]: ...


def options(name: str = "local", parallel: int = 1, **opts) -> ExecutorSection:
    try:
        return ExecutorSection.model_validate({"name": name, "parallel": parallel, **opts})
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        what = "unknown option" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        raise UserError(f"executor.{loc}: {what}") from None


def from_options(name: str = "local", parallel: int = 1, **opts) -> Executor:
    o = options(name, parallel, **opts)
    return {"local": LocalExecutor, "slurm": SlurmExecutor, "ray": RayExecutor}[o.name](o)


# -- one run, in a fresh process (runs wherever the executor put it) ---------------------------
_CHILD: list[subprocess.Popen] = []  # the training process of this worker, for a preemption signal


def train_args(o: ExecutorSection) -> list[str]:
    if o.launcher == "none":
        return []
    extra = ["--launcher", o.launcher, "--nproc", str(o.nproc)]
    return extra + (["--accelerate-config", str(Path(o.accelerate_config).resolve())] if o.accelerate_config else [])


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")[-n:]
    except OSError:
        return ""


def _ignore_preempt_signal() -> None:
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def execute(run: Run, timeout: float | None = None, env: dict | None = None, args: Sequence[str] = (),
            shielded: bool = False) -> dict:
    """Train one run in a fresh process: {"status", "seconds", "host", "error"} (error also in error.json).

    ``shielded``: the process ignores SIGUSR2, SLURM's (submitit's) preemption warning sent to every
    process of the job; the worker answers it with a SIGTERM, on which the trainer checkpoints.
    """
    run.dir.mkdir(parents=True, exist_ok=True)
    for stale in ("result.json", "error.json"):
        (run.dir / stale).unlink(missing_ok=True)
    # A run may bring its own command (peftkit.runs.trial_batch: several search trials in one process).
    cmd = run.command() if hasattr(run, "command") else train_command(run, args)
    if timeout is not None:
        timeout *= getattr(run, "runs_in_process", 1)
    pkg_root = str(Path(__file__).resolve().parents[1])
    full_env = {**os.environ, **(env or {}), "PYTHONPATH": pkg_root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    log = run.dir / "train.log"
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=full_env,
                             preexec_fn=die_with_parent(_ignore_preempt_signal if shielded else None))
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
    if rc == 0 and run.done():
        return {"status": "done", "seconds": seconds, "host": host, "error": None}
    err = error_record(run, rc, seconds, cmd, log)
    return {"status": "failed", "seconds": seconds, "host": host, "error": err}


def train_command(run: Run, args: Sequence[str] = ()) -> list[str]:
    """``peftkit train`` of the run's recipe (written next to its run directory) into that directory."""
    from peftkit import recipe as R

    rfile = run.dir.parent / f"seed{run.seed}.yaml"
    atomic_write_text(rfile, R.dump_yaml(run.recipe))
    return [sys.executable, "-m", "peftkit", "train", str(rfile), "--out", str(run.dir), "--force", *args]


def error_record(run: Run, rc, seconds: float, cmd: list[str], log: Path) -> dict:
    """A failed run's error.json (written): exit state, command, the log's tail; message = its last line."""
    err = {"variant": run.variant, "seed": run.seed, "recipe_hash": run.hash, "returncode": rc, "seconds": seconds,
           "host": socket.gethostname(), "command": cmd, "log_tail": _tail(log)}
    lines = [x for x in err["log_tail"].splitlines() if x.strip()]
    err["message"] = lines[-1] if lines else f"exit code {rc}"
    atomic_write_json(run.dir / "error.json", err)
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
def label(i: int, n: int, run: Run) -> str:
    return f"[{i}/{n}] {run.variant} seed {run.seed}"


def pending(runs: Sequence[Run], echo) -> tuple[list[Outcome | None], list[int]]:
    """Outcomes with the done runs filled in as skipped, and the indices still to run."""
    outs: list[Outcome | None] = [None] * len(runs)
    todo = []
    for i, r in enumerate(runs):
        if r.done():
            lab = label(i + 1, len(runs), r)
            outs[i] = Outcome(lab, r.dir, "skipped", 0.0, "-", None)
            echo(f"{lab}: up to date, skipped ({r.dir / 'result.json'})")
        else:
            todo.append(i)
    return outs, todo


def finish(lab: str, run: Run, rep: dict, where: str, echo) -> Outcome:
    out = Outcome(lab, run.dir, rep["status"], rep["seconds"], where, rep["error"])
    if out.status == "done":
        echo(f"{lab}: done in {out.seconds:.0f} s on {where}")
    else:
        echo(f"{lab}: FAILED in {out.seconds:.0f} s on {where} ({rep['error']['message']}); "
             f"details in {run.dir / 'error.json'}")
    return out


def failed_report(run: Run, message: str, seconds: float = 0.0) -> dict:
    """A run whose worker died before reporting (the engine's error), also written as error.json."""
    err = {"variant": run.variant, "seed": run.seed, "recipe_hash": run.hash, "returncode": None,
           "seconds": seconds, "message": message}
    run.dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run.dir / "error.json", err)
    return {"status": "failed", "seconds": seconds, "host": "?", "error": err}


def summary(outcomes: Sequence[Outcome], results: Sequence[str] | None = None) -> str:
    """One table: run, exit state, where, how long (and each run's result, when given)."""
    results = results or [""] * len(outcomes)
    rows = [("run", "status", "where", "seconds", "result")] + [
        (o.label, o.status, o.where, "-" if o.status == "skipped" else f"{o.seconds:.0f}", res)
        for o, res in zip(outcomes, results)]
    w = [max(len(r[k]) for r in rows) for k in range(5)]
    return "\n".join("  ".join(c.ljust(w[k]) for k, c in enumerate(r)).rstrip() for r in rows)


# -- local: N at once, each with its share of the CPUs or its own GPUs --------------------------
def visible_gpus() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g for g in env.split(",") if g.strip()]
    import torch

    return [str(k) for k in range(torch.cuda.device_count())]


class LocalExecutor:
    def __init__(self, o: ExecutorSection):
        self.o = o
        gpus = visible_gpus()
        per = o.gpus_per_run if o.gpus_per_run is not None else len(gpus) // o.parallel
        if per * o.parallel > len(gpus):
            raise UserError(f"executor: {o.parallel} runs x {per} GPU(s) each, but {len(gpus)} GPU(s) are visible")
        shared = bool(gpus) and per == 0 and o.gpus_per_run is None  # more runs than GPUs: they share, round-robin
        cpus = o.cpus_per_run or max(1, (os.cpu_count() or 1) // o.parallel)
        self.slots = []
        for k in range(o.parallel):
            env = {v: str(cpus) for v in THREAD_VARS} if o.parallel > 1 or o.cpus_per_run else {}
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = gpus[k % len(gpus)] if shared else ",".join(gpus[k * per:(k + 1) * per])
            self.slots.append(env)

    def _where(self, k: int, host: str) -> str:
        env = self.slots[k]
        res = [f"GPU {env['CUDA_VISIBLE_DEVICES'] or 'none'}"] if "CUDA_VISIBLE_DEVICES" in env else []
        res += [f"{env['OMP_NUM_THREADS']} threads"] if "OMP_NUM_THREADS" in env else []
        return f"local:{host} slot {k}" + (f" ({', '.join(res)})" if res else "")

    def run(self, runs, echo=print) -> list[Outcome]:
        outs, todo = pending(runs, echo)
        free: queue.Queue[int] = queue.Queue()
        for k in range(len(self.slots)):
            free.put(k)
        extra = train_args(self.o)

        def one(i: int) -> Outcome:
            k = free.get()
            try:
                lab = label(i + 1, len(runs), runs[i])
                echo(f"{lab}: training in a fresh process (slot {k}) …")
                rep = execute(runs[i], self.o.timeout_s, self.slots[k], extra)
                return finish(lab, runs[i], rep, self._where(k, rep["host"]), echo)
            finally:
                free.put(k)

        with ThreadPoolExecutor(max_workers=len(self.slots)) as pool:
            for i, o in zip(todo, pool.map(one, todo)):
                outs[i] = o
        return outs


# -- SLURM through submitit: one job array, requeued on preemption -----------------------------
def _submitit():
    try:
        import submitit
    except ImportError:
        raise UserError("--executor slurm needs submitit: pip install 'peftkit[cluster]'") from None
    return submitit


class TrainTask(Checkpointable):
    """One run as a submitit job; on preemption/timeout the trainer checkpoints and the job is requeued."""

    def __call__(self, run, timeout, env, args):
        import submitit

        return {**execute(run, timeout, env, args, shielded=True), "job_id": submitit.JobEnvironment().job_id}

    def checkpoint(self, *args, **kwargs):
        stop_child()  # the run dir now holds a checkpoint; the requeued job resumes from it
        return super().checkpoint(*args, **kwargs)


class SlurmExecutor:
    def __init__(self, o: ExecutorSection):
        self.o = o
        self.jobs: list = []  # submitted jobs (tests interrupt them to simulate a preemption)

    def executor(self, folder: Path):
        submitit = _submitit()
        ex = submitit.AutoExecutor(folder=folder / "%j", cluster=self.o.cluster)
        params = {"timeout_min": self.o.time_min, "cpus_per_task": self.o.cpus_per_run or 1,
                  "gpus_per_node": self.o.gpus_per_run or 0,
                  "name": "peftkit", "slurm_array_parallelism": self.o.parallel, **self.o.slurm}
        if self.o.partition:
            params["slurm_partition"] = self.o.partition
        ex.update_parameters(**params)
        return ex

    def run(self, runs, echo=print) -> list[Outcome]:
        outs, todo = pending(runs, echo)
        if not todo:
            return outs
        folder = runs[todo[0]].dir.parents[1] / "_slurm"  # <out>/_slurm/<job id>/: submitit's logs per run
        ex = self.executor(folder)
        t0 = time.perf_counter()
        with ex.batch():
            jobs = [ex.submit(TrainTask(), runs[i], self.o.timeout_s, {}, train_args(self.o)) for i in todo]
        self.jobs = jobs
        for i, job in zip(todo, jobs):
            lab = label(i + 1, len(runs), runs[i])
            echo(f"{lab}: submitted as job {job.job_id} (logs: {folder / str(job.job_id)})")
        for i, job in zip(todo, jobs):
            lab = label(i + 1, len(runs), runs[i])
            try:
                rep = job.result()
            except Exception as e:  # the job died outside peftkit train: node failure, cancelled, out of time
                msg = str(e).strip().splitlines()
                rep = failed_report(runs[i], f"slurm job {job.job_id}: {msg[-1] if msg else type(e).__name__}",
                                    round(time.perf_counter() - t0, 1))
            outs[i] = finish(lab, runs[i], rep, f"slurm:{job.job_id} on {rep['host']}", echo)
        return outs


# -- Ray: one remote task per run --------------------------------------------------------------
def _ray_execute(run, timeout, env, args):
    import ray

    ctx = ray.get_runtime_context()
    rep = execute(run, timeout, env, args)
    return {**rep, "node": ctx.get_node_id()[:8], "gpus": [str(g) for g in ray.get_gpu_ids()]}


class RayExecutor:
    def __init__(self, o: ExecutorSection):
        self.o = o

    def run(self, runs, echo=print) -> list[Outcome]:
        outs, todo = pending(runs, echo)
        if not todo:
            return outs
        try:
            import ray
        except ImportError:
            raise UserError("--executor ray needs ray: pip install 'peftkit[cluster]'") from None
        started = not ray.is_initialized()
        if started:
            pkg_root = str(Path(__file__).resolve().parents[1])
            ray.init(address=self.o.address, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": {"PYTHONPATH": pkg_root}},
                     **({} if self.o.address else {"num_cpus": max(self.o.parallel * (self.o.cpus_per_run or 1),
                                                                    os.cpu_count() or 1)}))
        try:
            return self._run(ray, runs, todo, outs, echo)
        finally:
            if started:
                ray.shutdown()

    def _run(self, ray, runs, todo, outs, echo):
        cpus, gpus = self.o.cpus_per_run or 1, self.o.gpus_per_run or 0
        remote = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=0)(_ray_execute)
        env = {v: str(cpus) for v in THREAD_VARS}
        waiting, refs, t0 = list(todo), {}, time.perf_counter()
        while waiting or refs:
            while waiting and len(refs) < self.o.parallel:
                i = waiting.pop(0)
                echo(f"{label(i + 1, len(runs), runs[i])}: submitted as a Ray task ({cpus} CPU, {gpus} GPU)")
                refs[remote.remote(runs[i], self.o.timeout_s, env, train_args(self.o))] = i
            ready, _ = ray.wait(list(refs), num_returns=1)
            i = refs.pop(ready[0])
            try:
                rep = ray.get(ready[0])
                where = f"ray:{rep['node']} on {rep['host']}" + (f" (GPU {','.join(rep['gpus'])})" if rep["gpus"] else "")
            except Exception as e:  # the worker died (node lost, out of memory)
                rep = failed_report(runs[i], f"ray task: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                                    round(time.perf_counter() - t0, 1))
                where = "ray"
            outs[i] = finish(label(i + 1, len(runs), runs[i]), runs[i], rep, where, echo)
        return outs
