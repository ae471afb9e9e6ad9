"""Shared parts of the benchmark scripts: data, clocks, subprocess runs, statistics, results.

Every measured run happens in its own subprocess (``python SCRIPT --worker JSON``) that prints
one ``BENCH_RESULT {json}`` line; the parent alternates tools/strategies and aggregates.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # this checkout's peftkit, not an installed one
    sys.path.insert(0, str(ROOT))


def _sst2_dir() -> Path:
    """$PEFTKIT_SST2, else ../shared/data/sst2 next to the checkout (or next to a worktree's parent)."""
    if os.environ.get("PEFTKIT_SST2"):
        return Path(os.environ["PEFTKIT_SST2"])
    for up in (ROOT.parent, ROOT.parent.parent):
        if (up / "shared" / "data" / "sst2").is_dir():
            return up / "shared" / "data" / "sst2"
    return ROOT.parent / "shared" / "data" / "sst2"


SST2 = _sst2_dir()
RESULTS = ROOT / "benchmarks" / "results"
MARK = "BENCH_RESULT "
USER_OMP_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY")  # before importing peftkit sets it


# -- data -------------------------------------------------------------------------------------
def sst2_data_section(n_train: int | None, n_eval: int | None = None, data_dir: Path = SST2) -> dict:
    """The peftkit recipe ``task.data`` for SST-2: a fixed seeded subset of train.tsv."""
    d = {"dir": str(data_dir), "train": "train.tsv", "validation": "validation.tsv", "test": "test.tsv",
         "format": "tsv", "split_seed": 0}
    if n_train:
        d["max_train_samples"] = n_train
    if n_eval:
        d["max_eval_samples"] = n_eval
    return d


def sst2_hf_splits(n_train: int | None, n_eval: int | None = None, data_dir: Path = SST2) -> dict:
    """The same subsets as :func:`sst2_data_section`, loaded with plain ``datasets``."""
    import datasets

    datasets.disable_progress_bars()
    kw = dict(delimiter="\t", quoting=csv.QUOTE_NONE, keep_default_na=False, split="train")
    train = datasets.load_dataset("csv", data_files=str(data_dir / "train.tsv"), **kw)
    test = datasets.load_dataset("csv", data_files=str(data_dir / "test.tsv"), **kw)
    if n_train and len(train) > n_train:
        train = train.shuffle(seed=0).select(range(n_train))
    if n_eval and len(test) > n_eval:
        test = test.select(range(n_eval))
    return {"train": train, "test": test}


# -- clocks -----------------------------------------------------------------------------------
class StepClock:
    """Times optimizer steps the same way whatever tool runs the loop.

    A global optimizer post-hook stamps the end of every step; a forward pre-hook on the
    model counts samples and real (attention-mask) tokens of training forwards. The time of
    step i is stamp[i] - stamp[i-1]: it includes data loading, logging and everything else
    the loop does between two optimizer steps. Steps of other optimizers (no training
    forward of this model before them) are not stamped.
    """

    def __init__(self, model, on_step=None):
        import torch
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.on_step = on_step  # called at each stamped step (e.g. to take that step's FLOPs)
        self.stamps: list[float] = []
        self.samples: list[int] = []
        self.tokens: list[int] = []
        self.padded: list[int] = []
        self._s = self._t = self._p = 0
        self.t_start = None
        self._h1 = register_optimizer_step_post_hook(self._post)
        self._h2 = model.register_forward_pre_hook(self._pre, with_kwargs=True)

    def _pre(self, module, args, kwargs):
        import torch

        if not (module.training and torch.is_grad_enabled()):
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        if self.t_start is None:
            self.t_start = time.perf_counter()
        self._s += ids.shape[0]
        self._t += int(mask.sum()) if mask is not None else ids.numel()
        self._p += ids.numel()

    def _post(self, opt, args, kwargs):
        if not self._s:  # no training forward of this model since the last step: not its optimizer
            return  # (e.g. peftkit's memory estimate steps an optimizer over fake tensors)
        self.stamps.append(time.perf_counter())
        if self.on_step is not None:
            self.on_step()
        self.samples.append(self._s)
        self.tokens.append(self._t)
        self.padded.append(self._p)
        self._s = self._t = self._p = 0

    def close(self):
        self._h1.remove()
        self._h2.remove()

    def phases(self, t_process: float) -> dict:
        """Seconds from ``t_process`` (the worker's first line, before any import) to the first
        training forward (start-up), from there to the last optimizer step (the training phase,
        first steps included), and both (time to a trained model)."""
        end = self.stamps[-1] if self.stamps else None
        return {"startup_s": self.t_start - t_process if self.t_start else None,
                "epoch_s": end - self.t_start if end and self.t_start else None,
                "to_trained_s": end - t_process if end else None}

    def summary(self, warmup: int) -> dict:
        """Throughput over the steps after ``warmup`` (from the end of step ``warmup``)."""
        n = len(self.stamps)
        if n <= warmup + 1:
            warmup = 0
        t0 = self.stamps[warmup - 1] if warmup else self.t_start
        dt = self.stamps[-1] - t0
        s, t, p = sum(self.samples[warmup:]), sum(self.tokens[warmup:]), sum(self.padded[warmup:])
        steps = [b - a for a, b in zip(self.stamps[max(0, warmup - 1):], self.stamps[max(1, warmup):])]
        return {"steps": n, "warmup_steps": warmup, "timed_s": dt, "samples_per_s": s / dt,
                "tokens_per_s": t / dt, "padded_tokens_per_s": p / dt, "padding_frac": 1 - t / p if p else 0.0,
                "step_time_median_s": statistics.median(steps) if steps else None}


def peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# -- subprocess runs --------------------------------------------------------------------------
def run_worker(script: Path, spec: dict, timeout: int = 3600, env: dict | None = None) -> dict:
    """Run ``script --worker SPEC`` in a fresh process; its BENCH_RESULT line as a dict.

    The child gets the environment this script started with (not OMP_WAIT_POLICY as set by
    importing peftkit here), plus ``env``.
    """
    base = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if USER_OMP_WAIT_POLICY is not None:
        base["OMP_WAIT_POLICY"] = USER_OMP_WAIT_POLICY
    env = {**base, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", **(env or {})}
    t0 = time.time()
    p = subprocess.run([sys.executable, str(script), "--worker", json.dumps(spec)], capture_output=True, text=True,
                       env=env, timeout=timeout, cwd=ROOT)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith(MARK)]
    if p.returncode != 0 or not lines:
        tail = (p.stderr or p.stdout).strip().splitlines()[-15:]
        raise RuntimeError(f"worker {spec} failed (rc {p.returncode}):\n" + "\n".join(tail))
    out = json.loads(lines[-1][len(MARK):])
    out["process_wall_s"] = time.time() - t0
    out["loadavg_after"] = os.getloadavg()
    return out


def emit(result: dict) -> None:
    print(MARK + json.dumps(result), flush=True)


def quiet() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("transformers", "accelerate", "datasets", "peft", "torch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass


# -- statistics and results -------------------------------------------------------------------
def spread(xs: list[float]) -> dict:
    xs = [x for x in xs if x is not None]
    if not xs:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs),
            "values": xs}


def environment() -> dict:
    import torch

    from peftkit import provenance

    env = provenance.environment()
    env["cpu_model"] = _cpu_model()
    env["platform"] = platform.platform()
    env["loadavg_start"] = os.getloadavg()
    env["started_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    env["torch_config_bf16"] = bool(getattr(torch.backends.mkldnn, "is_available", lambda: False)())
    env["cpu"] = cpu_section()
    return env


def cpu_section() -> dict:
    """What decides CPU speed here: SIMD flags, torch's kernel level, emulation variables, what
    ``precision: auto`` picks (with its bf16/fp32 matmul probe)."""
    from peftkit import hardware

    d = hardware.describe()
    return {"simd_flags": d["simd_flags"], "cpu_capability": d["cpu_capability"], "auto": d["auto"],
            "emulation": {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if k in os.environ}}


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def env_lines(env: dict) -> list[str]:
    v = env.get("versions", {})
    dev = env.get("device_name") if env.get("device") == "cuda" else env.get("cpu_model")
    return [
        f"- device: {env.get('device')} ({dev}), {env.get('cpu_count')} CPUs, torch threads {env.get('torch_threads')}",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
        f"- python {env.get('python')}, {env.get('platform')}",
        *_cpu_lines(env.get("cpu")),
        f"- git sha: {env.get('git_sha')}",
        f"- started: {env.get('started_at')}, load average at start: "
        + ", ".join(f"{x:.2f}" for x in env.get("loadavg_start", [])),
    ]


def _cpu_lines(cpu: dict | None) -> list[str]:
    if not cpu:
        return []
    auto, emu = cpu.get("auto") or {}, cpu.get("emulation") or {}
    probe = auto.get("probe") or {}
    return [f"- CPU flags: {' '.join(cpu.get('simd_flags') or [])}; torch kernels {cpu.get('cpu_capability')}"
            + (f"; emulating: {' '.join(f'{k}={v}' for k, v in emu.items())}" if emu else "; no emulation"),
            f"- precision auto → {auto.get('resolved')} ({auto.get('reason')}; 128² matmul bf16 "
            f"{probe.get('bf16_gflops')} vs fp32 {probe.get('fp32_gflops')} GFLOP/s)"
            + (f"; {cpu['note']}" if cpu.get("note") else "")]


def environment_section(data: dict, env: dict) -> list[str]:
    """The markdown tail every results file ends with: the environment, load at the end, wall time."""
    return ["", "## Environment", "", *env_lines(env),
            f"- load average at end: {', '.join(f'{x:.2f}' for x in data['loadavg_end'])}; wall "
            f"{data['wall_s'] / 60:.1f} min", ""]


def run_and_publish(args, run, markdown) -> None:
    """``run(args)`` timed, with the environment at its start and the load at its end, then published."""
    env = environment()
    t0 = time.time()
    data = run(args)
    data["env"], data["loadavg_end"] = env, os.getloadavg()
    data.setdefault("wall_s", time.time() - t0)
    publish(args.name, data, markdown(data, env), args.out, write=not args.smoke)


def publish(name: str, data: dict, markdown: str, out_dir: Path = RESULTS, write: bool = True) -> None:
    """Print the rendered table; with ``write``, save ``<name>.json`` (the data) and ``<name>.md``."""
    from peftkit.io import atomic_write_json, atomic_write_text

    print(markdown)
    if not write:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    j, m = out_dir / f"{name}.json", out_dir / f"{name}.md"
    atomic_write_json(j, data)
    atomic_write_text(m, markdown)
    print(f"wrote {j} and {m}")


def fmt(x, digits: int = 1) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


# -- smoke mode -------------------------------------------------------------------------------
def tiny_setup(root: Path | None = None) -> tuple[Path, Path]:
    """A tiny random BERT (MiniLM's tokenizer) and tiny SST-2-shaped TSVs, for ``--smoke``."""
    import random
    import tempfile

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig

    from peftkit.assets import locate

    root = Path(root or tempfile.mkdtemp(prefix="peftkit-bench-smoke-"))
    model_dir, data_dir = root / "tiny-bert", root / "sst2"
    if not (model_dir / "config.json").exists():
        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=128, num_labels=2)
        AutoModelForSequenceClassification.from_config(cfg).save_pretrained(model_dir)
        AutoTokenizer.from_pretrained(locate("builtin:minilm").parent).save_pretrained(model_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    words = {1: ["good", "great", "fun", "moving"], 0: ["bad", "dull", "weak", "boring"]}
    for name, n in (("train", 128), ("validation", 32), ("test", 32)):
        with open(data_dir / f"{name}.tsv", "w", encoding="utf-8") as f:
            f.write("sentence\tlabel\n")
            for _ in range(n):
                y = rng.randint(0, 1)
                f.write(" ".join(rng.choices(["the", "film", "was", "a", "plot"], k=rng.randint(1, 12))
                                 + rng.sample(words[y], 2)) + f"\t{y}\n")
    return model_dir, data_dir
