"""The trainer's progress (``TrainState``) and how any nested state becomes JSON + tensors.

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

    def state_dict(self) -> dict:
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
