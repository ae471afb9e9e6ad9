"""Golden losses: every strategy, a tiny random-weight BERT, exact per-step numbers pinned.

A silent change to training (data order, loss scaling, accumulation, scheduler, a strategy's
initialisation) changes these numbers and fails here. Regenerate only on purpose:
``PEFTKIT_GOLDEN=print python -m pytest tests/test_golden_loss.py -s`` prints the new table.

Tolerance: fp32 on CPU is deterministic on one machine, but oneDNN/ATen pick different
kernels on AVX2, AVX-512 and AMX CPUs (blocking and reduction order of matmuls), which
changes the last bits of a sum; over a few steps of training such differences stay around
1e-7 relative, so 1e-5 relative is far above that noise and far below any real change (a
different batch, a missing scale of a short accumulation group or a different LR moves a
loss by 1e-3 or more).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import TINY, _tokenizer, tiny_recipe
from peftkit import recipe as R
from peftkit import strategies

REL = 1e-5
# 96 rows / batch 8 = 12 micro-batches per epoch; grad_accum 5 -> steps of 5, 5 and a short
# group of 2 micro-batches at the epoch's end; step 4 opens epoch 1. No warm-up: a first step at LR 0 would pin nothing.
TRAIN = {"max_steps": 4, "grad_accum": 5, "log_every": 1, "warmup_ratio": 0.0, "lr": 1e-2,
         "precision": "fp32", "seed": 0, "checkpoint_every": None}

# strategy -> [(loss, lr) per step] from log.jsonl, the final eval metrics, the train loss.
# Regenerated when the classification head started training the pooler (task.train_pooler,
# issue #18): every strategy that freezes the backbone now also trains pooler.dense.
GOLDEN: dict[str, dict] = {
    "adapter": {
        "steps": [(0.706707215309143, 0.0075), (0.7085824489593506, 0.005),
                  (0.694647878408432, 0.0025), (0.6914762020111084, 0.0)],
        "eval": {"accuracy": 0.4375, "macro_f1": 0.30434782608695654, "examples": 32}, "train_loss": 0.6914762020111084},
    "bitfit": {
        "steps": [(0.706707215309143, 0.0075), (0.7090796709060669, 0.005),
                  (0.8049252331256866, 0.0025), (0.6275599777698517, 0.0)],
        "eval": {"accuracy": 0.5625, "macro_f1": 0.5333333333333333, "examples": 32}, "train_loss": 0.6275599777698517},
    "freeze": {
        "steps": [(0.706707215309143, 0.0075), (0.8088866591453552, 0.005),
                  (2.374028503894806, 0.0025), (1.2861767835915088, 0.0)],
        "eval": {"accuracy": 0.5625, "macro_f1": 0.36, "examples": 32}, "train_loss": 1.2861767835915088},
    "full": {
        "steps": [(0.706707215309143, 0.0075), (0.8066193580627441, 0.005),
                  (2.405869424343109, 0.0025), (1.2497147291898727, 0.0)],
        "eval": {"accuracy": 0.5625, "macro_f1": 0.36, "examples": 32}, "train_loss": 1.2497147291898727},
    "ia3": {
        "steps": [(0.706707215309143, 0.0075), (0.7092484354972839, 0.005),
                  (0.7124394774436951, 0.0025), (0.6775352597236634, 0.0)],
        "eval": {"accuracy": 0.4375, "macro_f1": 0.30434782608695654, "examples": 32}, "train_loss": 0.6775352597236634},
    "lora": {
        "steps": [(0.706707215309143, 0.0075), (0.7155685782432556, 0.005),
                  (1.098853886127472, 0.0025), (0.6076126754283905, 0.0)],
        "eval": {"accuracy": 0.625, "macro_f1": 0.611336032388664, "examples": 32}, "train_loss": 0.6076126754283905},
    "prefix": {
        "steps": [(0.7317774891853333, 0.0075), (1.2751408457756042, 0.005),
                  (0.8010602742433548, 0.0025), (0.7746138036251068, 0.0)],
        "eval": {"accuracy": 0.4375, "macro_f1": 0.30434782608695654, "examples": 32}, "train_loss": 0.7746138036251068},
    "qlora": {
        "steps": [(0.7233805060386658, 0.0075), (1.2149195194244384, 0.005),
                  (0.7869639992713928, 0.0025), (0.7164353549480438, 0.0)],
        "eval": {"accuracy": 0.4375, "macro_f1": 0.30434782608695654, "examples": 32}, "train_loss": 0.7164353549480438},
}


@pytest.fixture(scope="module")
def bert64(tmp_path_factory):
    """Tiny BERT, hidden 64: bitsandbytes' CPU 4-bit kernel needs >= 64 input features (qlora)."""
    from transformers import AutoModel

    d = tmp_path_factory.mktemp("golden-bert64")
    torch.manual_seed(0)
    cfg = TINY["bert"]()
    cfg.hidden_size, cfg.intermediate_size = 64, 128
    cfg.initializer_range = 0.1  # 0.02 gives near-constant outputs: every strategy would look alike
    AutoModel.from_config(cfg).save_pretrained(d)
    _tokenizer("bert").save_pretrained(d)
    return d


def run(model_dir, data_dir, strategy: str, out) -> dict:
    from peftkit.model.build import build
    from peftkit.training.trainer import Trainer

    rec = tiny_recipe(model_dir, data_dir, strategy, **TRAIN)
    rec["model"]["compute_dtype"] = "fp32"
    rec["output"] = {"report_to": []}
    b = build(R.from_dict(rec))
    for m in b.model.modules():  # qlora: the AVX-512-bf16 packed kernel (eval mode) exists on some CPUs only
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    res = Trainer(b, out).fit()
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    steps = [(x["loss"], x["lr"]) for x in log if "loss" in x]
    # "loss" (mean validation cross-entropy, what search rungs rank by) is newer than the golden values
    ev = {k: v for k, v in res["metrics"]["eval"].items() if k not in ("eval_s", "eval_samples_per_s", "loss")}
    return {"steps": steps, "eval": ev, "train_loss": res["metrics"]["train_loss"]}


@pytest.mark.parametrize("strategy", sorted(strategies.REGISTRY))
def test_golden_losses(strategy, bert64, sentiment_dir, tmp_path):
    got = run(bert64, sentiment_dir, strategy, tmp_path / strategy)
    if os.environ.get("PEFTKIT_GOLDEN") == "print":
        print(f"\n    {strategy!r}: {got!r},")
        return
    want = GOLDEN[strategy]
    assert [s for s, _ in got["steps"]] == pytest.approx([s for s, _ in want["steps"]], rel=REL)
    assert [lr for _, lr in got["steps"]] == pytest.approx([lr for _, lr in want["steps"]], rel=1e-12)
    assert got["eval"] == pytest.approx(want["eval"], rel=REL)
    assert got["train_loss"] == pytest.approx(want["train_loss"], rel=REL)
