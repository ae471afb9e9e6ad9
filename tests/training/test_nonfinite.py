"""NaN/Inf loss or gradients: skip a bounded number of steps, or stop; never checkpoint bad weights.

The NaN is injected in-process with a forward hook on the built model (no test hook in the
recipe schema).
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from conftest import inject_nonfinite, tiny_recipe
from peftkit.training import checkpoint
from peftkit import cli
from peftkit import recipe as R
from peftkit.training.state import TrainState


@pytest.fixture(autouse=True)
def _no_progress_bars():
    import transformers

    transformers.utils.logging.disable_progress_bar()
    yield
    transformers.utils.logging.enable_progress_bar()


def train(capsys, tmp_path, tiny_models, sentiment_dir, **train):
    r = tiny_recipe(tiny_models["bert"], sentiment_dir, "lora", **{"max_steps": 6, "log_every": 1, **train})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
    out = tmp_path / "out"
    capsys.readouterr()
    rc = cli.main(["train", str(tmp_path / "r.yaml"), "--out", str(out)])
    return rc, capsys.readouterr().err, out


def test_skip_bounded(capsys, tmp_path, tiny_models, sentiment_dir, monkeypatch):
    inject_nonfinite(monkeypatch, {2: "loss", 4: "grad"})
    rc, err, out = train(capsys, tmp_path, tiny_models, sentiment_dir, max_nonfinite_skips=2)
    assert rc == 0, err
    assert "step 2: non-finite loss nan; step skipped (1/2)" in err
    assert "step 4: non-finite gradient norm" in err and "(2/2)" in err
    res = json.loads((out / "result.json").read_text())
    assert res["metrics"]["nonfinite_skipped_steps"] == 2
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(out / "strategy.safetensors").values())
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log if "nonfinite_skipped" in x] == [2, 4]


@pytest.mark.parametrize("policy, limit, match", [
    ("stop", 10, "step 3: non-finite loss nan (train.nonfinite: stop); stopping"),
    ("skip", 1, "(1 step(s) skipped already, train.max_nonfinite_skips=1); stopping"),
])
def test_stop_keeps_last_good_checkpoint(capsys, tmp_path, tiny_models, sentiment_dir, monkeypatch,
                                         policy, limit, match):
    inject_nonfinite(monkeypatch, {3: "loss" if policy == "stop" else "grad", 4: "grad"})
    rc, err, out = train(capsys, tmp_path, tiny_models, sentiment_dir, nonfinite=policy,
                         max_nonfinite_skips=limit, checkpoint_every=1)
    lines = [x for x in err.splitlines() if x.startswith("peftkit: error")]
    assert rc == 1 and len(lines) == 1 and match in lines[0], err
    assert not (out / "result.json").exists()
    kept = checkpoint.step_dirs(out / "checkpoints")
    assert kept and all(checkpoint.verify(p) is None for p in kept)


def test_non_finite_weights_are_never_checkpointed(tmp_path, tiny_models, sentiment_dir):
    from accelerate import Accelerator

    from peftkit import strategies
    from peftkit.errors import TrainingFailed

    recipe = R.from_dict(tiny_recipe(tiny_models["bert"], sentiment_dir, "full"))
    acc = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    model, opt, sched = acc.prepare(model, opt, sched)
    ck = checkpoint.Checkpointer(acc, tmp_path, recipe, resume=False)
    ck.attach(model, strategies.get(recipe.strategy), opt, sched, None)
    ck.save(TrainState(step=1))
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(TrainingFailed, match="weights became non-finite .*last good checkpoint is .*step-00000001"):
        ck.save(TrainState(step=2))
    assert [p.name for p in checkpoint.step_dirs(tmp_path / "checkpoints")] == ["step-00000001"]
