"""ray: one Ray task per job, with num_cpus/num_gpus; a running cluster (``address``) or a local instance."""

from __future__ import annotations

import os
import time
from typing import Any, ClassVar, Literal

from peftkit.errors import UserError
from peftkit.runs.executors.base import PACKAGE_ROOT, THREAD_VARS, Executor, ExecutorConfig, Outcome, execute, \
    failed_report, finish, label, pending, train_args


class RayConfig(ExecutorConfig):
    name: Literal["ray"] = "ray"
    address: str | None = None  # cluster address ("auto", "ray://host:10001"); None = a local instance

    FLAGS: ClassVar[dict[str, dict[str, Any]]] = {
        "address": {"help": "ray cluster address (default: a local Ray instance)"}}


def execute_on_worker(job, timeout, env, args):
    """The Ray task: :func:`execute` on the worker, with the node and GPUs Ray gave it."""
    import ray

    ctx = ray.get_runtime_context()
    rep = execute(job, timeout, env, args)
    return {**rep, "node": ctx.get_node_id()[:8], "gpus": [str(g) for g in ray.get_gpu_ids()]}


class RayExecutor(Executor):
    """Ray tasks on a running cluster (--address) or a local instance."""

    name = "ray"
    Config = RayConfig

    def run(self, jobs, echo=print) -> list[Outcome]:
        outs, todo = pending(jobs, echo)
        if not todo:
            return outs
        try:
            import ray
        except ImportError:
            raise UserError("--executor ray needs ray: pip install 'peftkit[cluster]'") from None
        started = not ray.is_initialized()
        if started:
            c = self.cfg
            local = {} if c.address else {"num_cpus": max(c.parallel * (c.cpus_per_run or 1), os.cpu_count() or 1)}
            ray.init(address=c.address, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": {"PYTHONPATH": PACKAGE_ROOT}}, **local)
        try:
            return self._run(ray, jobs, todo, outs, echo)
        finally:
            if started:
                ray.shutdown()

    def _run(self, ray, jobs, todo, outs, echo):
        cpus, gpus = self.cfg.cpus_per_run or 1, self.cfg.gpus_per_run or 0
        remote = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=0)(execute_on_worker)
        env = {v: str(cpus) for v in THREAD_VARS}
        waiting, refs, t0 = list(todo), {}, time.perf_counter()
        while waiting or refs:
            while waiting and len(refs) < self.cfg.parallel:
                i = waiting.pop(0)
                echo(f"{label(i + 1, len(jobs), jobs[i])}: submitted as a Ray task ({cpus} CPU, {gpus} GPU)")
                refs[remote.remote(jobs[i], self.cfg.timeout_s, env, train_args(self.cfg))] = i
            ready, _ = ray.wait(list(refs), num_returns=1)
            i = refs.pop(ready[0])
            try:
                rep = ray.get(ready[0])
                gpus = f" (GPU {','.join(rep['gpus'])})" if rep["gpus"] else ""
                where = f"ray:{rep['node']} on {rep['host']}{gpus}"
            except Exception as e:  # the worker died (node lost, out of memory)
                first = str(e).splitlines()[0] if str(e) else ""
                rep = failed_report(jobs[i], f"ray task: {type(e).__name__}: {first}", round(time.perf_counter() - t0, 1))
                where = "ray"
            outs[i] = finish(label(i + 1, len(jobs), jobs[i]), jobs[i], rep, where, echo)
        return outs
