"""model.frozen_dtype: under bf16 autocast, frozen linear weights are stored in bf16 once."""

import json

import pytest
import torch

from conftest import tiny_recipe
from peftkit import hardware, strategies
from peftkit import recipe as R
from peftkit.model.build import build
from peftkit.training.trainer import Trainer


def _built(tiny_models, sentiment_dir, strategy="lora", **model):
    d = tiny_recipe(tiny_models["bert"], sentiment_dir, strategy, precision="bf16")
    d["model"].update(model)
    return build(R.from_dict(d))


def test_cast_frozen_touches_only_frozen_matmul_weights(tiny_models, sentiment_dir):
    model = _built(tiny_models, sentiment_dir).model
    before = {n: (p.dtype, p.numel(), p.requires_grad) for n, p in model.named_parameters()}
    saved = strategies.cast_frozen(model, torch.bfloat16)
    kinds = {n: type(m) for n, m in model.named_modules()}
    cast = 0
    for n, p in model.named_parameters():
        owner = kinds[n.rsplit(".", 1)[0]]
        frozen_matmul = not p.requires_grad and issubclass(owner, torch.nn.Linear)
        assert p.dtype == (torch.bfloat16 if frozen_matmul else torch.float32), (n, owner, p.requires_grad)
        cast += before[n][1] * 2 if frozen_matmul else 0
    assert cast > 0 and saved == cast  # 2 bytes saved per element, each tensor once
    assert any(p.requires_grad and p.dtype == torch.float32 for p in model.parameters())  # adapters + head
    assert strategies.cast_frozen(model, torch.bfloat16) == 0  # idempotent


def test_cast_frozen_leaves_a_weight_tied_to_an_embedding(tiny_models):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], tie_word_embeddings=True)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    for p in model.parameters():
        p.requires_grad_(False)
    assert strategies.cast_frozen(model, torch.bfloat16) > 0  # the attention/MLP projections
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert model.lm_head.weight.dtype == torch.float32
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16


def test_cast_is_bit_identical_under_autocast(tiny_models, sentiment_dir):
    import copy

    model = _built(tiny_models, sentiment_dir).model.eval()  # no dropout: two forwards comparable
    cast = copy.deepcopy(model)
    assert strategies.cast_frozen(cast, torch.bfloat16) > 0
    ids = torch.randint(5, 100, (4, 12))
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([0, 1, 0, 1]))
    out = []
    for m in (model, cast):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m(**batch).loss
        loss.backward()
        out.append((loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}))
    assert torch.equal(out[0][0], out[1][0])
    assert out[0][1].keys() == out[1][1].keys() and all(torch.equal(out[0][1][n], out[1][1][n]) for n in out[0][1])


def test_frozen_dtype_rule():
    base = {"name": "x", "train": {"precision": "bf16"}}
    assert hardware.frozen_dtype(R.from_dict(base)) == torch.bfloat16
    assert hardware.frozen_dtype(R.from_dict({**base, "train": {"precision": "fp32"}})) is None
    assert hardware.frozen_dtype(R.from_dict({**base, "model": {"frozen_dtype": "keep"}})) is None
    assert hardware.frozen_dtype(R.from_dict({**base, "model": {"dtype": "bf16"}})) is None  # already stored low


@pytest.mark.parametrize("frozen", ["auto", pytest.param("keep", marks=pytest.mark.slow)])  # keep: 15 s more
def test_trainer_records_the_cast_and_halves_frozen_weight_bytes(tiny_models, sentiment_dir, tmp_path, frozen):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # a bf16 Accelerator after an fp32 one in this process
    built = _built(tiny_models, sentiment_dir, frozen_dtype=frozen)
    weights = sum(p.numel() * p.element_size() for p in built.model.parameters())
    try:
        res = Trainer(built, tmp_path / "run").fit()
    finally:
        AcceleratorState._reset_state(True)
    rec = json.loads((tmp_path / "run" / "result.json").read_text())["run"]["frozen_weights"]
    live = res["memory"]["measured"]["live"]["at_peak"]["weights"]
    if frozen == "keep":
        assert rec is None and live == pytest.approx(weights, rel=0.02)
    else:
        assert rec["dtype"] == "bfloat16" and 0 < rec["bytes_saved"] < weights
        assert live == pytest.approx(weights - rec["bytes_saved"], rel=0.02)
    losses = [json.loads(x).get("loss") for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    losses = [x for x in losses if x is not None]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
