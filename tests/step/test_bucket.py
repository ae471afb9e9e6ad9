"""train.pad_to_multiple_of: training batches padded to a multiple; the loss ignores the extra padding."""

import json

import pytest
import torch

from conftest import dropout_free_setup, tiny_recipe
from peftkit.step import bucket
from peftkit import recipe as R
from peftkit.model.build import build
from peftkit.training.trainer import Trainer


def test_round_up_and_cap():
    assert [bucket.round_up(n, 16) for n in (1, 16, 17, 33)] == [16, 16, 32, 48]
    assert bucket.round_up(17, None) == 17
    assert bucket.round_up(50, 16, cap=56) == 56 and bucket.round_up(60, 16, cap=56) == 60


def test_pad_to_multiple_pads_every_token_key():
    def collate(f):
        return {"input_ids": torch.ones(2, 5, dtype=torch.long), "attention_mask": torch.ones(2, 5, dtype=torch.long),
                "labels": torch.zeros(2, 5, dtype=torch.long), "cls": torch.tensor([1, 0])}

    b = bucket.PadToMultiple(collate, 8, pad_token_id=3)([])
    assert b["input_ids"].shape == (2, 8) and b["input_ids"][:, 5:].eq(3).all()
    assert b["attention_mask"][:, 5:].eq(0).all() and b["labels"][:, 5:].eq(-100).all()
    assert b["cls"].tolist() == [1, 0]


@pytest.mark.parametrize("kind", ["bert", pytest.param("llama", marks=pytest.mark.slow)])  # llama: 20 s more
def test_bucketed_training_has_the_dynamic_padding_loss(tiny_models, sentiment_dir, tmp_path, kind):
    """Extra right padding is masked out: the first step's loss is the dynamic-padding one
    (same data order and init; no dropout, whose masks depend on the shape), and every
    training batch length is a multiple of 16."""
    from accelerate.state import AcceleratorState

    model = dropout_free_setup(tiny_models["bert"], tmp_path, 8, 8)[0] if kind == "bert" else tiny_models[kind]

    losses, shapes = {}, {}
    for m in (None, 16):
        d = tiny_recipe(model, sentiment_dir, "lora", max_steps=2, log_every=1, pad_to_multiple_of=m)
        built = build(R.from_dict(d))
        seen = []
        built.model.register_forward_pre_hook(
            lambda mod, a, kw: seen.append(kw["input_ids"].shape[1]) if mod.training else None, with_kwargs=True)
        try:
            Trainer(built, tmp_path / str(m)).fit()
        finally:
            AcceleratorState._reset_state(True)
        log = [json.loads(x) for x in (tmp_path / str(m) / "log.jsonl").read_text().splitlines()]
        losses[m] = [x["loss"] for x in log if "loss" in x]
        shapes[m] = seen
    assert all(t % 16 == 0 for t in shapes[16]) and any(t % 16 for t in shapes[None])
    assert losses[16][0] == pytest.approx(losses[None][0], rel=1e-4)
