"""The trainer's progress (``TrainState``; ``Run``: everything one fit works with; ``StepValues``:
a step's values still on the device) and how any nested state becomes JSON + tensors.

A checkpoint stores the optimizer, scheduler, scaler, RNG states and a ``TrainState``;
tensors go to safetensors and the rest to JSON, so loading a checkpoint never runs code.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch


@dataclass
class TrainState:
    """Where training stands after ``step`` optimizer steps: all a resume needs of the loop."""

    step: int = 0
    epoch: int = 0
    position: int = 0  # micro-batches of this epoch already trained (the data position)
    losses: list[float] = field(default_factory=list)  # train loss of every finite step
    history: list[dict] = field(default_factory=list)  # evaluations during training
    nonfinite_skips: int = 0

    def __post_init__(self):
        # Called before a checkpoint takes the state: the trainer brings the steps still on the
        # device to the host first (a signal can ask for a checkpoint at any step).
        self.before_save = None

    def state_dict(self) -> dict:
        if self.before_save is not None:
            self.before_save()
        return asdict(self)

    def load_state_dict(self, d: dict) -> None:
        d = {"position": d.get("batches", 0), **d}  # checkpoints before TrainState called it "batches"
        for f in fields(self):
            setattr(self, f.name, d[f.name])

    def next_epoch(self) -> None:
        self.epoch, self.position = self.epoch + 1, 0

    def train_loss(self, window: int) -> float | None:
        """Mean loss of the last ``window`` finite steps (None before the first)."""
        tail = self.losses[-max(1, min(len(self.losses), window)):]
        return sum(tail) / len(tail) if tail else None


@dataclass
class StepValues:
    """One optimizer step's loss and gradient norm, still on the device until ``read_values``."""

    step: int
    epoch: int
    micro_batches: int
    loss_sum: torch.Tensor  # this process's sum of weighted micro-batch losses (float64)
    grad_norm: torch.Tensor | None
    ok: bool | None  # decided on the host already; None: decided on the device, counted when read
    sched_steps: int = 0  # scheduler increments of this step (undone if it turns out skipped)


def read_values(values: list[StepValues], acc) -> list[dict]:
    """The steps' values on the host in one transfer: ``loss`` (mean over micro-batches and
    processes), this process's ``loss_sum``, ``grad_norm`` (NaN when not computed)."""
    if not values:
        return []
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=values[0].loss_sum.device)
    t = torch.stack([torch.stack([v.loss_sum.to(torch.float64), nan if v.grad_norm is None
                                  else v.grad_norm.detach().to(nan.device, torch.float64), nan]) for v in values])
    t[:, 2] = acc.reduce(t[:, 0].contiguous(), reduction="sum") if acc.num_processes > 1 else t[:, 0]
    rows = t.tolist()
    return [{"step": v.step, "epoch": v.epoch, "loss_sum": r[0], "grad_norm": r[1],
             "loss": r[2] / acc.num_processes / v.micro_batches, "ok": v.ok, "sched_steps": v.sched_steps}
            for v, r in zip(values, rows)]


@dataclass
class Run:
    """Everything one ``Trainer.fit`` works with (made by its ``_setup``): the typed progress object."""

    data: dict
    total: int  # optimizer steps of this run
    stop: int  # where this process stops: ``total``, or earlier for a search rung
    model: torch.nn.Module  # prepared (wrapped) model
    opt: object
    sched: object
    ck: object  # training.checkpoint.Checkpointer (which imports this module)
    guard: object  # training.nonfinite.NonFiniteGuard
    meters: object  # training.meters.Meters
    params: tuple[int, int]  # (trainable, total), before FSDP/ZeRO shard them
    frozen_cast: dict | None  # frozen weights stored in the autocast dtype (model.frozen_dtype), or None
    state: TrainState = field(default_factory=TrainState)
    on_device: bool = False  # the non-finite guard skips steps on the device (no host read per step)
    unread: list[StepValues] = field(default_factory=list)  # steps whose loss is still on the device
    resumed_from: int | None = None
    times: dict = field(default_factory=dict)  # load_s, data_s, train_s, train_eval_s, eval_s
    t_start: float = 0.0  # before the data was read (wall_s counts from here, plus loading)

    @property
    def rung(self) -> bool:
        """A search rung (train.stop_at): validation only, checkpointed where it stops."""
        return self.stop < self.total


# -- nested state <-> (JSON, tensors) -------------------------------------------------------
def encode(obj, tensors: dict, key: str = "s"):
    """A JSON-able copy of ``obj``; tensors are moved to ``tensors`` under a path-like key.

    Tuples, non-string dict keys and numpy arrays are tagged so that ``decode`` gives back
    the same types (optimizer param groups, RNG states).
    """
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not any(k.startswith("__") and k.endswith("__") for k in obj):
            return {k: encode(v, tensors, f"{key}.{k}") for k, v in obj.items()}
        return {"__items__": [[encode(k, tensors, f"{key}.k{i}"), encode(v, tensors, f"{key}.{i}")]
                              for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"checkpoint: cannot store a {type(obj).__name__} at {key}")


def decode(obj, tensors: dict):
    if isinstance(obj, list):
        return [decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
        if "__tuple__" in obj:
            return tuple(decode(v, tensors) for v in obj["__tuple__"])
        if "__items__" in obj:
            return {decode(k, tensors): decode(v, tensors) for k, v in obj["__items__"]}
        return {k: decode(v, tensors) for k, v in obj.items()}
    return obj


# -- RNG ------------------------------------------------------------------------------------
def rng_state() -> dict:
    s = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
