"""Checkpoints that survive kills: atomic, checksummed, and enough state to resume exactly.

One checkpoint is a directory ``run_dir/checkpoints/step-00000012/`` with

- ``strategy.safetensors``: the strategy's weights (every trainable parameter);
- ``state.safetensors`` + ``state.json``: optimizer, LR scheduler, grad scaler, every RNG
  state, the log position and the trainer's ``TrainState`` (encoded by peftkit.training.state);
- ``manifest.json``, written last: schema, step, recipe hash and the sha256 of each file.

It is written with ``peftkit.io.atomic_dir`` (every file fsync'ed, then one rename), so a
kill leaves either the whole checkpoint or nothing; a checksum mismatch (bit rot, a copy
cut short) makes the loader fall back to the previous checkpoint with a warning.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from peftkit.errors import UserError
from peftkit.io import atomic_dir, atomic_write_bytes, atomic_write_json, is_partial, sha256
from peftkit.log import warn
from peftkit.training.signals import Interrupted, StopSignals
from peftkit.training.signals import name as signal_name
from peftkit.training.state import TrainState, decode, encode, rng_state, set_rng_state

SCHEMA = "peftkit.checkpoint/1"
DIR = "checkpoints"
_STEP = re.compile(r"^step-(\d{8,})$")


# -- files ----------------------------------------------------------------------------------
def step_dirs(root: Path) -> list[Path]:
    """Complete checkpoint directories (renamed into place), oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def read_manifest(path: Path) -> dict | None:
    try:
        m = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and m.get("schema") == SCHEMA else None


def verify(path: Path) -> str | None:
    """None if the checkpoint is intact, else what is wrong with it (one phrase)."""
    m = read_manifest(path)
    if m is None:
        return "manifest.json missing or unreadable"
    for name, info in m.get("files", {}).items():
        try:
            data = (path / name).read_bytes()
        except OSError:
            return f"{name} missing"
        if len(data) != info.get("bytes") or sha256(data) != info.get("sha256"):
            return f"{name} fails its sha256 check"
    return None


def write(root: Path, step: int, recipe_hash: str, weights: dict, state: dict, keep: int) -> Path:
    """Write one checkpoint atomically; keep the newest ``keep``; return its directory."""
    from safetensors.torch import save

    tensors: dict = {}
    meta = encode(state, tensors)
    files = {
        "strategy.safetensors": save({k: v.detach().contiguous().cpu() for k, v in weights.items()}),
        "state.safetensors": save(tensors),
        "state.json": (json.dumps(meta) + "\n").encode(),
    }
    final = root / f"step-{step:08d}"
    with atomic_dir(final) as tmp:  # an existing one is a corrupt leftover of an earlier attempt
        for name, data in files.items():
            atomic_write_bytes(tmp / name, data)
        atomic_write_json(tmp / "manifest.json", {
            "schema": SCHEMA, "step": step, "recipe_hash": recipe_hash,
            "files": {n: {"bytes": len(d), "sha256": sha256(d)} for n, d in files.items()}})
    for old in step_dirs(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


@dataclass
class Loaded:
    path: Path
    step: int
    weights: dict
    state: dict


def load(path: Path) -> Loaded:
    from safetensors.torch import load as st_load

    weights = st_load((path / "strategy.safetensors").read_bytes())
    tensors = st_load((path / "state.safetensors").read_bytes())
    state = decode(json.loads((path / "state.json").read_text(encoding="utf-8")), tensors)
    return Loaded(path, int(state["step"]), weights, state)


def latest_good(root: Path, recipe_hash: str) -> Loaded | None:
    """The newest intact checkpoint; broken newer ones are reported and removed."""
    for path in reversed(step_dirs(root)):
        problem = verify(path)
        if problem is None:
            h = read_manifest(path)["recipe_hash"]
            if h != recipe_hash:
                raise UserError(f"{path}: checkpoint of a different recipe (hash {h}, this recipe {recipe_hash})")
            return load(path)
        older = [p.name for p in step_dirs(root) if p.name < path.name]
        warn(f"checkpoint {path} is corrupt ({problem}); "
             + (f"falling back to {older[-1]}" if older else "no older checkpoint, starting from scratch"))
        shutil.rmtree(path, ignore_errors=True)
    return None


def clean_partial(root: Path) -> None:
    """Remove temporary directories left by a kill during a checkpoint write."""
    if root.is_dir():
        for p in root.iterdir():
            if is_partial(p.name) or p.name.startswith((".tmp-", ".old-")):  # (older peftkit's names)
                shutil.rmtree(p, ignore_errors=True)


# -- the trainer's side ---------------------------------------------------------------------
class Checkpointer:
    """Small hooks for the trainer: resume at the start, save every N steps and on signals."""

    def __init__(self, acc, run_dir: Path, recipe, resume: bool):
        self.acc, self.run_dir, self.recipe = acc, Path(run_dir), recipe
        self.root = self.run_dir / DIR
        self.every, self.keep = recipe.train.checkpoint_every, recipe.train.keep_checkpoints
        from peftkit.step import distributed

        self.sharded = distributed.sharded(acc)
        self.hash = recipe.hash()
        self.resume = resume
        self.signals = StopSignals()
        self.loaded: Loaded | None = None
        self.parts: tuple = ()

    def attach(self, model, strategy, opt, sched, log) -> None:
        """The prepared objects a checkpoint saves and restores (and the log it cuts back)."""
        self.parts = (model, strategy, opt, sched, log)

    def begin(self) -> Loaded | None:
        """Before the log is opened: record the recipe (once), find the checkpoint to resume from."""
        from peftkit.recipe import dump_yaml

        if self.sharded:
            self.every, self.resume = None, False
            self.acc.print("[peftkit] note: checkpoints are not written under FSDP/DeepSpeed (sharded state)")
        path = None
        if self.acc.is_main_process:
            atomic_write_bytes(self.run_dir / "recipe.yaml", dump_yaml(self.recipe).encode())
            clean_partial(self.root)
            if self.resume:
                self.loaded = latest_good(self.root, self.hash)
                path = self.loaded and str(self.loaded.path)
                if self.loaded is None and (self.run_dir / "log.jsonl").exists():
                    os.truncate(self.run_dir / "log.jsonl", 0)  # starting from scratch after all
        if self.acc.num_processes > 1:  # rank 0 chose (and cleaned up); the others follow
            from accelerate.utils import broadcast_object_list

            path = broadcast_object_list([path])[0]
            if path is not None and not self.acc.is_main_process:
                self.loaded = load(Path(path))
        if self.loaded is not None and self.acc.is_main_process:
            log = self.run_dir / "log.jsonl"
            # Steps after the checkpoint are redone: drop their log lines (and a cut-off last line).
            if log.exists() and log.stat().st_size > self.loaded.state["log_bytes"]:
                os.truncate(log, self.loaded.state["log_bytes"])
            print(f"[peftkit] resuming from {self.loaded.path} (step {self.loaded.step})", file=sys.stderr)
        return self.loaded

    def restore(self, state: TrainState) -> None:
        """Weights, optimizer, scheduler, scaler and RNG into the attached objects; ``state`` as saved."""
        model, strategy, opt, sched, _ = self.parts
        s = self.loaded.state
        strategy.load_state_dict(self.acc.unwrap_model(model), self.loaded.weights)
        opt.load_state_dict(s["optimizer"])
        sched.load_state_dict(s["scheduler"])
        if self.acc.scaler is not None and s.get("scaler") is not None:
            self.acc.scaler.load_state_dict(s["scaler"])
        rngs = s["rng"]
        if len(rngs) != self.acc.num_processes:
            warn(f"checkpoint was written by {len(rngs)} process(es), this run has {self.acc.num_processes}: "
                 "data order is kept, dropout randomness is not")
        set_rng_state(rngs[min(self.acc.process_index, len(rngs) - 1)])
        state.load_state_dict(s["trainer"])

    def _stop_requested(self) -> int:
        signum = self.signals.signum
        if self.acc.num_processes > 1:  # every process must stop at the same step
            signum = int(self.acc.reduce(torch.tensor(signum, device=self.acc.device), "max"))
        return signum

    def step_end(self, state: TrainState) -> None:
        """After each optimizer step: save when due or when a signal asked to stop, then stop."""
        signum = self._stop_requested()
        if not signum and not (self.every and state.step % self.every == 0):
            return
        if self.sharded:
            raise Interrupted(f"{signal_name(signum)} at step {state.step}: no checkpoint under FSDP/DeepSpeed",
                              signum)
        path = self.save(state)
        if signum:
            raise Interrupted(f"{signal_name(signum)} at step {state.step}: checkpoint saved to {path}; "
                              "run the same command again to resume", signum)

    def save(self, state: TrainState) -> Path:
        from peftkit.errors import TrainingFailed

        model, strategy, opt, sched, log = self.parts
        step = state.step
        weights = strategy.state_dict(self.acc.unwrap_model(model))
        bad = [n for n, t in weights.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:  # never replace a good checkpoint by a broken one
            raise TrainingFailed(f"step {step}: weights became non-finite ({bad[0]}); not checkpointed; "
                                 f"the last good checkpoint is {(step_dirs(self.root) or ['none'])[-1]}")
        rngs = self._gather_rng()
        path = self.root / f"step-{step:08d}"
        if self.acc.is_main_process:
            saved = {
                "step": step,
                "recipe_hash": self.hash,
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "scaler": self.acc.scaler.state_dict() if self.acc.scaler is not None else None,
                "rng": rngs,
                "log_bytes": log.tell() if log is not None else 0,
                "trainer": state.state_dict(),
            }
            path = write(self.root, step, self.hash, weights, saved, self.keep)
        self.acc.wait_for_everyone()
        return path

    def _gather_rng(self) -> list[dict]:
        """Every process's RNG state (they differ once batches of different shapes used dropout)."""
        mine = rng_state()
        if self.acc.num_processes == 1:
            return [mine]
        from accelerate.utils import gather_object

        return gather_object([mine])
