"""local: N jobs at once on this machine, each with its share of the CPUs or its own GPUs."""

from __future__ import annotations

import os
import queue
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

from peftkit.errors import UserError
from peftkit.runs.executors.base import THREAD_VARS, Executor, ExecutorConfig, Outcome, execute, finish, label, \
    pending, train_args


class LocalConfig(ExecutorConfig):
    name: Literal["local"] = "local"


def visible_gpus() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g for g in env.split(",") if g.strip()]
    import torch

    return [str(k) for k in range(torch.cuda.device_count())]


class LocalExecutor(Executor):
    """local processes, N at once (--parallel), each with its share of CPUs or its own GPUs."""

    name = "local"
    Config = LocalConfig

    def __init__(self, cfg: LocalConfig):
        super().__init__(cfg)
        gpus = visible_gpus()
        per = cfg.gpus_per_run if cfg.gpus_per_run is not None else len(gpus) // cfg.parallel
        if per * cfg.parallel > len(gpus):
            raise UserError(f"executor: {cfg.parallel} runs x {per} GPU(s) each, but {len(gpus)} GPU(s) are visible")
        shared = bool(gpus) and per == 0 and cfg.gpus_per_run is None  # more runs than GPUs: they share, round-robin
        cpus = cfg.cpus_per_run or max(1, (os.cpu_count() or 1) // cfg.parallel)
        self.slots = []  # each slot's environment: thread counts, CUDA_VISIBLE_DEVICES
        for k in range(cfg.parallel):
            env = {v: str(cpus) for v in THREAD_VARS} if cfg.parallel > 1 or cfg.cpus_per_run else {}
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = gpus[k % len(gpus)] if shared else ",".join(gpus[k * per:(k + 1) * per])
            self.slots.append(env)

    def _where(self, k: int, host: str) -> str:
        env = self.slots[k]
        res = [f"GPU {env['CUDA_VISIBLE_DEVICES'] or 'none'}"] if "CUDA_VISIBLE_DEVICES" in env else []
        res += [f"{env['OMP_NUM_THREADS']} threads"] if "OMP_NUM_THREADS" in env else []
        return f"local:{host} slot {k}" + (f" ({', '.join(res)})" if res else "")

    def run(self, jobs, echo=print) -> list[Outcome]:
        outs, todo = pending(jobs, echo)
        free: queue.Queue[int] = queue.Queue()
        for k in range(len(self.slots)):
            free.put(k)
        extra = train_args(self.cfg)

        def one(i: int) -> Outcome:
            k = free.get()
            try:
                lab = label(i + 1, len(jobs), jobs[i])
                echo(f"{lab}: training in a fresh process (slot {k}) …")
                rep = execute(jobs[i], self.cfg.timeout_s, self.slots[k], extra)
                return finish(lab, jobs[i], rep, self._where(k, rep["host"]), echo)
            finally:
                free.put(k)

        with ThreadPoolExecutor(max_workers=len(self.slots)) as pool:
            for i, o in zip(todo, pool.map(one, todo)):
                outs[i] = o
        return outs
