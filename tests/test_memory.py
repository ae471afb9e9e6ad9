import json

import pytest
import torch

from conftest import run_cli, tiny_recipe
from peftkit import memory
from peftkit import recipe as R


def _train_step(model, acct, batch=4, seq=12, precision="fp32"):
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], foreach=True)
    ids = torch.randint(1000, 2000, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, seq - 3:] = 0  # some padding, as in real batches
    with acct.saved.pass_((batch, seq)), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = model(input_ids=ids, attention_mask=mask, labels=torch.zeros(batch, dtype=torch.long)).loss
    loss.backward()
    acct.after_backward(model)
    opt.step()
    acct.after_step(model, opt)
    return acct.summary()


def _built(tiny_models, sentiment_dir, kind, strategy, **train):
    from peftkit.build import build

    return build(R.from_dict(tiny_recipe(tiny_models[kind], sentiment_dir, strategy, **train)))


def test_full_accounting_is_exact(tiny_models, sentiment_dir):
    b = _built(tiny_models, sentiment_dir, "bert", "full")
    n = sum(p.numel() for p in b.model.parameters())
    acc = _train_step(b.model, memory.Accountant(b.model))
    # AdamW keeps exp_avg and exp_avg_sq in fp32 for every trainable parameter.
    opt = acc["optimizer"]["by_state"]
    assert opt["exp_avg"] + opt["exp_avg_sq"] == 2 * 4 * n
    assert acc["optimizer"]["total_bytes"] == pytest.approx(2 * 4 * n, rel=1e-3)
    assert acc["gradients"]["total_bytes"] == 4 * n
    assert acc["weights"]["by_type"]["float32"] == 4 * n
    assert acc["activations"]["total_bytes"] > 0 and acc["activations"]["batch_shape"] == [4, 12]
    assert acc["total_bytes"] == sum(acc[k]["total_bytes"] for k in ("weights", "gradients", "optimizer", "activations"))


def test_saved_tensors_count_each_storage_once_and_skip_parameters():
    lin = torch.nn.Linear(8, 8, bias=False)
    saved = memory.SavedTensors(lin)
    x = torch.randn(16, 8, requires_grad=True)
    with saved.pass_((16, 8)):
        y = x * x  # saves x twice: one storage
        z = lin(y)  # saves y and the weight (a parameter: excluded)
    z.sum().backward()
    assert saved.summary()["total_bytes"] == 2 * 16 * 8 * 4
    assert saved.summary()["tensors"] == 2


def test_qlora_weights_are_packed_and_smaller(tiny_models, sentiment_dir):
    lora = memory.weight_bytes(_built(tiny_models, sentiment_dir, "llama", "lora").model)
    q = _built(tiny_models, sentiment_dir, "llama", "qlora")
    qw = memory.weight_bytes(q.model)
    packed = qw["by_type"]["nf4(4bit packed)"]
    n4 = sum(p.quant_state.shape.numel() for p in q.model.parameters() if getattr(p, "quant_state", None) is not None)
    assert packed == n4 // 2 and qw["by_type"]["quant_state"] > 0
    # Each quantized weight: 4 bytes (fp32) -> half a byte, plus its quant state.
    saved = 4 * n4 - packed - qw["by_type"]["quant_state"]
    assert lora["total_bytes"] - qw["total_bytes"] == pytest.approx(saved, rel=0.01) and saved > 0


@pytest.mark.parametrize("kind,strategy,precision", [("bert", "full", "bf16"), ("llama", "lora", "bf16"),
                                                      ("gpt2", "full", "fp32")])
def test_estimate_matches_accounting(tiny_models, sentiment_dir, kind, strategy, precision):
    from peftkit.estimate import estimate

    b = _built(tiny_models, sentiment_dir, kind, strategy, precision=precision)
    acc = _train_step(b.model, memory.Accountant(b.model), precision=precision)
    est = estimate(b.recipe, batch_size=4, seq_len=12, task=b.task, tokenizer=b.tokenizer)
    assert est["params"]["trainable"] == sum(p.numel() for p in b.model.parameters() if p.requires_grad)
    for comp in ("weights", "gradients"):
        assert est[comp]["total_bytes"] == acc[comp]["total_bytes"], comp
    assert est["optimizer"]["total_bytes"] == acc["optimizer"]["total_bytes"]
    assert est["activations"]["total_bytes"] == pytest.approx(acc["activations"]["total_bytes"], rel=0.15)
    assert est["total_bytes"] == pytest.approx(acc["total_bytes"], rel=0.05)


def test_estimate_cli_minilm_loads_no_weights(monkeypatch, tmp_path):
    import transformers

    from peftkit.estimate import estimate

    def refuse(*a, **k):
        raise AssertionError("estimate must not load weights")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(refuse))
    r = R.load(R.__file__.replace("peftkit/recipe.py", "recipes/quickstart.yaml"), ["strategy.name=full"])
    est = estimate(r)
    assert est["params"]["total"] == est["params"]["trainable"] == 22_713_986  # all-MiniLM-L6-v2 + 2-label head
    assert est["optimizer"]["total_bytes"] == pytest.approx(2 * 4 * 22_713_986, rel=1e-3)
    assert est["seq_len"] == 64 and est["batch_size"] == 32 and est["activations"]["total_bytes"] > 0


def test_estimate_cli_json_on_tiny(tiny_models, sentiment_dir, tmp_path):
    import yaml

    rec = tmp_path / "r.yaml"
    rec.write_text(yaml.safe_dump(tiny_recipe(tiny_models["gpt2"], sentiment_dir, "lora")))
    p = run_cli("estimate", str(rec), "strategy.r=4", "--seq-len", "16", "--json")
    assert p.returncode == 0, p.stderr
    est = json.loads(p.stdout)
    assert est["seq_len"] == 16 and est["total_bytes"] == sum(
        est[k]["total_bytes"] for k in ("weights", "gradients", "optimizer", "activations"))
    p = run_cli("estimate", str(rec), "strategy.nope=1")
    assert p.returncode == 2 and "strategy.nope" in p.stderr and len(p.stderr.strip().splitlines()) == 1
