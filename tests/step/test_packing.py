"""Padding-free causal-LM batches: same loss and same training as padded batches (real causal_lm task)."""

import pytest
import torch
from conftest import gen_recipe, instr_dir  # noqa: F401  (fixture)

from peftkit import recipe as R
from peftkit.step.packing import PaddingFree, batch_counts


def _build(tiny_models, data, strategy="lora", **train):
    from peftkit.model.build import build

    return build(R.from_dict(gen_recipe(tiny_models["llama"], data, strategy=strategy, **train)))


@pytest.fixture(scope="module")
def sft(tiny_models, instr_dir):  # noqa: F811
    """The causal_lm task on the tiny Llama (no strategy), and train examples of different lengths."""
    from peftkit.model.build import build

    b = build(R.from_dict(gen_recipe(tiny_models["llama"], instr_dir, strategy="full")), apply_strategy=False)
    ds = b.task.datasets()["train"]
    by_len = sorted(range(len(ds)), key=lambda i: ds[i]["length"])
    feats = [ds[i] for i in (by_len[0], by_len[-1], by_len[len(ds) // 2], by_len[1])]
    assert len({f["length"] for f in feats}) > 1  # padding happens
    return b, feats


def test_padding_free_batch_has_the_padded_loss(sft):
    b, feats = sft
    model = b.model.eval()
    flat = PaddingFree()(feats)
    assert flat["input_ids"].shape[0] == 1 and "attention_mask" not in flat
    assert batch_counts(flat) == (4, sum(f["length"] for f in feats))
    padded = b.task.collate(feats)  # the task's own padded batch: prompt tokens labelled -100
    assert (padded["labels"] == -100).any(1).all()
    assert batch_counts(padded) == batch_counts(flat)
    with torch.no_grad():
        lp = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], labels=padded["labels"]).loss
        lf = model(**flat).loss
        # Without the position ids the sequences would attend across their boundaries.
        lx = model(input_ids=flat["input_ids"], labels=flat["labels"], use_cache=False).loss
    assert lf.item() == pytest.approx(lp.item(), abs=1e-5)
    assert abs(lx.item() - lp.item()) > 1e-4


def test_padding_free_refuses_example_labels():
    from peftkit.errors import UserError

    with pytest.raises(UserError, match="train.padding_free"):
        PaddingFree()([{"input_ids": [1, 2, 3], "labels": 1}])


def test_trainer_padding_free_trains_like_padded(tiny_models, instr_dir, tmp_path):  # noqa: F811
    from accelerate.state import AcceleratorState

    from peftkit.training.trainer import Trainer

    start, weights = {}, {}
    try:
        for pf in (False, True):
            built = _build(tiny_models, instr_dir, max_steps=3, batch_size=8, padding_free=pf, lr=1e-2)
            assert built.task.kind == "causal_lm" and built.recipe.train.precision == "fp32"
            start[pf] = {k: v.clone() for k, v in built.strategy.state_dict(built.model).items()}
            res = Trainer(built, tmp_path / f"pf{pf}").fit()
            assert res["speed"]["steps"] == 3
            weights[pf] = {k: v.clone() for k, v in built.strategy.state_dict(built.model).items()}
    finally:
        AcceleratorState._reset_state(True)
    assert weights[True].keys() == weights[False].keys()
    for k in weights[True]:
        assert torch.equal(start[True][k], start[False][k]), k
        # fp32, but padded and padding-free batches are different matmul shapes, so BLAS sums
        # in a different order (which order depends on the CPU's kernels: AVX2 vs AVX-512/AMX).
        # Adam divides by sqrt(v): an element whose gradient is ~eps (1e-8) turns that rounding
        # into a visible part of lr (seen on an AVX2 EPYC: 1 of 256 lora_A elements 1.3e-5 off,
        # every other one < 4e-7). So: per tensor, the runs differ by < 1e-3 of how far training
        # moved it; a real difference (sequences attending across boundaries) is of order 1.
        moved = (weights[False][k] - start[False][k]).norm()
        diff = (weights[True][k] - weights[False][k]).norm()
        assert diff <= 1e-3 * moved, (k, diff.item(), moved.item())
    assert any(weights[True][k].abs().sum() > 0 for k in weights[True] if "lora_B" in k)  # it did train
