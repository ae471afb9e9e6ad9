"""The steady loop keeps per-step values on the device and reads them every train.log_every
steps; measurement steps (the FLOP counter's first, the live-memory probe) stay out of speed.

A direct test of "no host sync per step" is not possible on CPU; these pin what the deferred
reads must still give: the same logged values, the same skipped steps, the same counts.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import fit, inject_nonfinite, tiny_recipe
from peftkit.step import measure
from peftkit.training.nonfinite import NonFiniteGuard


def _log(out):
    return [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]


def test_logged_windows_equal_the_per_step_values(tiny_models, sentiment_dir, tmp_path):
    rec = tiny_recipe(tiny_models["bert"], sentiment_dir, "lora", max_steps=7, log_every=3, log_step_values=True)
    res = fit(rec, tmp_path / "run")
    log = _log(tmp_path / "run")
    per = {r["step"]: r for r in log if "step_loss" in r}
    windows = [r for r in log if "loss" in r]
    assert sorted(per) == list(range(1, 8)) and [w["step"] for w in windows] == [3, 6, 7]
    assert all(r["step_tokens"] > 0 and r["grad_norm"] > 0 and not r["skipped"] for r in per.values())
    for w in windows:
        steps = range(max(1, w["step"] - 2), w["step"] + 1)  # the last log_every steps
        assert w["loss"] == pytest.approx(sum(per[s]["step_loss"] for s in steps) / len(steps), rel=1e-12)
        assert w["tokens"] == sum(per[s]["step_tokens"] for s in steps)
    assert res["metrics"]["train_loss"] == pytest.approx(windows[-1]["loss"], rel=1e-12)
    assert res["metrics"]["nonfinite_skipped_steps"] == 0


def test_per_step_values_are_off_by_default(tiny_models, sentiment_dir, tmp_path):
    fit(tiny_recipe(tiny_models["bert"], sentiment_dir, "lora", max_steps=4, log_every=2), tmp_path / "run")
    log = _log(tmp_path / "run")
    assert not any("step_loss" in r for r in log) and [r["step"] for r in log if "loss" in r] == [2, 4]


@pytest.mark.parametrize("optimizer", ["adamw_fused", "adamw"])
def test_a_planted_nan_step_is_skipped_as_on_the_host(tiny_models, sentiment_dir, tmp_path, monkeypatch, capsys,
                                                      optimizer):
    """Fused AdamW decides on the device and counts at the read (log_every=4: steps 2 and 5 are
    read at 4 and 8); plain AdamW decides on the host each step. Same skips, messages, lrs."""
    inject_nonfinite(monkeypatch, {2: "loss", 5: "grad"})
    rec = tiny_recipe(tiny_models["bert"], sentiment_dir, "lora", max_steps=8, log_every=4, optimizer=optimizer,
                      warmup_ratio=0.0, log_step_values=True, checkpoint_every=None)
    res = fit(rec, tmp_path / "run")
    err = capsys.readouterr().err
    assert "step 2: non-finite loss nan; step skipped (1/10)" in err
    assert "step 5: non-finite gradient norm" in err and "(2/10)" in err
    assert res["metrics"]["nonfinite_skipped_steps"] == 2
    log = _log(tmp_path / "run")
    assert [r["step"] for r in log if "nonfinite_skipped" in r] == [2, 5]
    assert [r["step"] for r in log if r.get("skipped")] == [2, 5]
    # 8 steps, 2 skipped: the linear schedule took 6 steps, wherever the decision was made
    assert [r["lr"] for r in log if "lr" in r][-1] == pytest.approx(1e-3 * (8 - 6) / 8, rel=1e-12)
    assert all(torch.isfinite(torch.tensor(r["step_loss"])) for r in log if "step_loss" in r and not r["skipped"])


def test_the_device_skip_leaves_weights_and_optimizer_state_as_they_were():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1, fused=True)
    guard = NonFiniteGuard("skip", 10, None, warn=lambda m: None)
    assert guard.on_device(opt) and not guard.on_device(torch.optim.AdamW([p], foreach=True))
    p.grad = torch.ones(3)
    opt.step()  # one real step: moments and step count exist
    before = (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()})
    p.grad = torch.full((3,), float("nan"))
    bad = guard.mask(opt, torch.tensor(1.0, dtype=torch.float64), torch.tensor(float("nan")))
    opt.step()
    assert bool(bad) and torch.equal(p.detach(), before[0])
    assert all(torch.equal(opt.state[p][k], v) for k, v in before[1].items())
    p.grad = torch.ones(3)
    assert not bool(guard.mask(opt, torch.tensor(1.0, dtype=torch.float64), torch.tensor(1.0)))
    opt.step()
    assert int(opt.state[p]["step"]) == 2 and not torch.equal(p.detach(), before[0])


def test_measurement_steps_are_not_in_speed(tiny_models, sentiment_dir, tmp_path):
    from peftkit.model.build import build
    from peftkit import recipe as R
    from peftkit.training.trainer import Trainer

    rec = tiny_recipe(tiny_models["bert"], sentiment_dir, "full", max_steps=8, eval_every=4)
    trainer = Trainer(build(R.from_dict(rec)), tmp_path / "run")
    seen = {}
    real = trainer._finish

    def finish(run):
        seen["steps"] = [(s.step, s.kind) for s in run.meters.timer.steps]
        seen["times"] = list(run.meters.timer.times)
        return real(run)

    trainer._finish = finish
    res = trainer.fit()
    sp = res["speed"]
    # warm-up = min(3, 8 // 5) = 1 step: the FLOP step is it; the probe is the second step
    assert seen["steps"] == [(1, "flops"), (2, "probe")] + [(s, "steady") for s in range(3, 9)]
    assert len(seen["times"]) == 6 and sp["timed_steps"] == 6 and sp["excluded_steps"] == {"flops": 1, "probe": 2}
    assert res["memory"]["measured"]["live"]["step"] == 2
    assert sp["step_time_p50_s"] == sp["step_time_median_s"] <= sp["step_time_p90_s"] <= sp["step_time_max_s"]
    assert sp["model_flops_per_s"] > 0 and sp["train_tokens_per_s"] > 0 and sp["stalls"] >= 0
    # train_s: the training phase without the evaluation at step 4, which is reported apart
    assert sp["train_eval_s"] == pytest.approx(res["metrics"]["history"][0]["eval_s"])
    assert 0 < sp["train_s"] < sp["wall_s"]


def test_speed_percentiles_and_stalls():
    t = measure.StepTimer(warmup=1, excluded={3: "probe"})
    for i, secs in enumerate([9.0, 1.0, 50.0, 1.0, 1.0, 1.0, 1.0, 2.0, 1.0, 1.0, 1.0, 10.0], start=1):
        with t.step(i):
            pass
        t.add_counts(torch.tensor(4), 10 * i)
        t._open[-1][2] = t._open[-1][1] + secs  # the host clock on CPU: plant the duration
    assert [s.step for s in t.read()] == list(range(1, 13))
    assert t.times == [9.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0, 1.0, 1.0, 1.0, 10.0]  # no probe step
    s = t.summary()
    assert (s["warmup_steps"], s["timed_steps"], s["excluded_steps"]) == (1, 10, {"probe": 3})
    assert (s["step_time_p50_s"], s["step_time_p90_s"], s["step_time_max_s"], s["stalls"]) == (1.0, 2.0, 10.0, 2)
    assert s["train_tokens"] == 10 * (sum(range(2, 13)) - 3) and s["train_samples"] == 40
    assert s["train_tokens_per_s"] == pytest.approx(s["train_tokens"] / 20.0)
