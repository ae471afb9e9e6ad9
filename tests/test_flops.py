"""Model FLOPs for MFU: 6N full training, 4N + 2N_trainable with frozen weights, plus attention."""

import pytest
import torch

from peftkit import measure


def test_train_flops_formula():
    f = measure.train_flops(1000, 1000, tokens=10)
    assert f["total"] == 6 * 1000 * 10 and f["per_token"] == 6000
    frozen = measure.train_flops(1000, 10, tokens=10)
    assert frozen["total"] == (4 * 1000 + 2 * 10) * 10
    # Attention: 4·d per query-key pair and layer forward, x3 with backward; causal halves the pairs.
    a = measure.train_flops(0, 0, tokens=4, sum_sq_len=16, layers=2, d_attn=8)
    assert a["attention"] == 3 * 4 * 2 * 8 * 16
    causal = measure.train_flops(0, 0, tokens=4, sum_sq_len=16, layers=2, d_attn=8, causal=True)
    assert causal["attention"] == a["attention"] / 2
    assert measure.mfu(50.0, 100.0) == 0.5 and measure.mfu(None, 100.0) is None


def test_matmul_params_by_type(tiny_models):
    import peft
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_models["bert"], num_labels=2)
    n, nt = measure.matmul_params(model)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert n == nt == sum(m.weight.numel() for m in linears)  # embeddings are lookups, not counted
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["query", "value"]))
    n2, nt2 = measure.matmul_params(lora)
    added = 2 * 2 * 4 * (32 + 32)  # 2 layers x (query, value) x (A: 32x4, B: 4x32)
    assert n2 == n + added and nt2 == added
    f = measure.model_train_flops(lora, [5, 7])
    layers, d = measure.attention_dims(model.config)
    assert (layers, d) == (2, 32) and not measure.is_causal(model.config)
    assert f["total"] == pytest.approx((4 * n2 + 2 * nt2) * 12 + 3 * 4 * layers * d * (25 + 49))


def test_matmul_peak_is_positive():
    assert measure.matmul_peak_flops("cpu", torch.float32, n=64, iters=2, warmup=1) > 0
