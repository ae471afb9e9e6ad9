"""Trainer loop edge cases that used to spin forever instead of saying what is wrong."""

from __future__ import annotations

import signal

import pytest

from conftest import tiny_recipe
from peftkit import recipe as R
from peftkit.errors import UserError


@pytest.fixture
def deadline():
    """Turn a hang into a failure: SIGALRM after 120 s raises inside the spinning loop."""
    def alarm(signum, frame):
        raise TimeoutError("fit() did not return within 120 s (an endless loop)")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def test_an_epoch_without_batches_is_a_user_error(tiny_models, sentiment_dir, tmp_path, monkeypatch, deadline):
    from peftkit.model.build import build
    from peftkit.training.trainer import Trainer

    # What a train split gives when every batch is dropped: the memory estimate's scan for the
    # longest batch and the epoch loop used to run forever on it.
    monkeypatch.setattr(Trainer, "train_batches", lambda self, ds, epoch: [])
    built = build(R.from_dict(tiny_recipe(tiny_models["bert"], sentiment_dir, "lora")))
    with pytest.raises(UserError, match=r"^task.data: the train split has 96 example\(s\): no batch to train on$"):
        Trainer(built, tmp_path / "run").fit()
    assert not (tmp_path / "run" / "result.json").exists()
