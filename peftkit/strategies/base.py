"""The strategy contract.

A strategy takes a loaded model and returns it with exactly the intended parameters
trainable. Strategies never look at tasks: the task head is handed over by module name
(``head``) and always stays trainable.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from peftkit.config import Section


class StrategyConfig(Section):
    name: str


class Strategy:
    """Base class. Subclasses set ``name``, ``Config`` and ``default_lr`` and implement ``apply`` and
    ``expected_trainable``; registration (``strategies/__init__.py``) refuses a class without them."""

    name: ClassVar[str]
    Config: ClassVar[type[StrategyConfig]]
    can_merge: ClassVar[bool] = False
    # Whether the backbone must be quantized (qlora) or must not be (full, freeze, bitfit).
    needs_quantized: ClassVar[bool | None] = None
    # The backbone's quantization when the recipe names none (qlora: 4bit); read by peftkit.recipe.
    default_quantization: ClassVar[str] = "none"
    # The learning rates a search tries when the recipe gives none (peftkit.runs.search_space): 3 points
    # x3 apart around the rate recipes/quickstart/compare.yaml gives the strategy, so a search can only
    # improve on it on validation and an edge pick says which way to extend. 3 points with eta 2 cost
    # 1.75 budgets and choose at half the budget (4 points: 2 budgets); the quickstart's 25% rung ranks
    # rates poorly, its 50% rung better. Each strategy cites the published range its centre lies in.
    default_lr: ClassVar[tuple[float, ...]]

    def __init__(self, cfg: StrategyConfig):
        self.cfg = cfg

    # -- validation -----------------------------------------------------------------------
    def check(self, recipe) -> list[str]:
        """Problems with this strategy in this recipe, found before any weight is loaded."""
        problems = []
        quant = recipe.model.quantization != "none"
        if self.needs_quantized is True and not quant:
            problems.append(f"strategy '{self.name}' needs model.quantization: 4bit or 8bit")
        if self.needs_quantized is False and quant:
            problems.append(
                f"strategy '{self.name}' trains base weights and cannot run on a quantized "
                f"backbone (model.quantization={recipe.model.quantization}); use lora or qlora"
            )
        return problems

    # -- the contract ---------------------------------------------------------------------
    def apply(self, model: nn.Module, head: list[str]) -> nn.Module:
        raise NotImplementedError

    def expected_trainable(self, facts) -> int:
        """How many parameters ``apply`` leaves trainable (task head included) on a model with these
        ``facts`` (a ``peftkit.strategies.facts.ModelFacts``; not annotated: that module imports this
        one): from the method's definition and the model's shapes, never from ``requires_grad``.
        tests/strategies/test_contract.py compares it with ``count_params`` of the applied model."""
        raise NotImplementedError

    def merge(self, model: nn.Module) -> nn.Module:
        """Fold the strategy into the base weights; returns a plain transformers model."""
        if not self.can_merge:
            raise NotImplementedError(f"strategy '{self.name}' cannot be merged into base weights")
        return model

    def base_model(self, model: nn.Module) -> nn.Module:
        """The transformers model underneath any wrapper (peft)."""
        return model

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Only the strategy's own weights: every trainable parameter (head included)."""
        return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def load_state_dict(self, model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
        params = dict(model.named_parameters())
        missing = [n for n, p in params.items() if p.requires_grad and n not in sd]
        unknown = [n for n in sd if n not in params]
        if missing or unknown:
            raise ValueError(f"strategy weights do not fit the model: missing {missing[:3]}, unknown {unknown[:3]}")
        with torch.no_grad():
            for n, t in sd.items():
                params[n].copy_(t)


def freeze_all(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def unfreeze(model: nn.Module, names: list[str]) -> None:
    """Make the named submodules (the task head) trainable."""
    for name in names:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) counting each distinct tensor once; 4-bit storage counted as elements."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        # bitsandbytes Params4bit pack two 4-bit values per uint8 element.
        if getattr(p, "quant_state", None) is not None:
            n = int(torch.Size(p.quant_state.shape).numel())
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def cast_frozen(model: nn.Module, dtype: torch.dtype) -> int:
    """Store the frozen weights of linear layers in ``dtype``, once; bytes saved.

    Under bf16/fp16 autocast every linear re-casts its fp32 weight at every forward (and the
    backward keeps the cast copy): for a frozen weight that copy is the same each step. Stored
    in the compute dtype, autocast's cast is a no-op and the results are bit-identical.
    Trainable parameters (adapters, head, BitFit's biases) stay fp32 for the optimizer;
    embeddings and norms stay as loaded (no autocast cast to save: a bf16 embedding would
    change the dtype of the residual stream). A weight tied to a non-linear module (an
    embedding shared with the output projection) is left alone.
    """
    owners: dict[int, list[nn.Module]] = {}
    for mod in model.modules():
        for p in mod._parameters.values():
            if p is not None:
                owners.setdefault(id(p), []).append(mod)
    saved, seen = 0, set()
    for mod in model.modules():
        if not isinstance(mod, nn.Linear):
            continue
        for p in mod._parameters.values():
            if (p is None or p.requires_grad or not p.is_floating_point() or p.dtype == dtype or id(p) in seen
                    or not all(isinstance(o, nn.Linear) for o in owners[id(p)])):
                continue
            seen.add(id(p))
            saved += p.numel() * (p.element_size() - torch.finfo(dtype).bits // 8)
            p.data = p.data.to(dtype)  # in place on the Parameter: module references stay valid
    return saved

