"""Padding-free causal-LM batches: same loss and same training as padded batches."""

import pytest
import torch

from peftkit.packing import PaddingFree, batch_counts


def _features(tok, texts):
    out = []
    for t in texts:
        ids = tok(t)["input_ids"]
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": ids, "length": len(ids)})
    return out


def _padded(tok, features):
    n = max(len(f["input_ids"]) for f in features)
    pad = tok.pad_token_id
    ids = torch.tensor([f["input_ids"] + [pad] * (n - len(f["input_ids"])) for f in features])
    mask = torch.tensor([[1] * len(f["input_ids"]) + [0] * (n - len(f["input_ids"])) for f in features])
    labels = torch.tensor([f["labels"] + [-100] * (n - len(f["labels"])) for f in features])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


TEXTS = ["the film was good", "a dull and boring story that went on", "fun", "great acting and a moving plot"]


@pytest.fixture(scope="module")
def llama(tiny_models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["llama"])
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], attn_implementation="sdpa", dtype=torch.float32)
    return tok, model.eval()


def test_padding_free_batch_has_the_padded_loss(llama):
    tok, model = llama
    feats = _features(tok, TEXTS)
    flat = PaddingFree()(feats)
    assert flat["input_ids"].shape[0] == 1 and "attention_mask" not in flat
    assert batch_counts(flat) == (4, sum(f["length"] for f in feats))
    padded = _padded(tok, feats)
    assert batch_counts(padded) == batch_counts(flat)
    with torch.no_grad():
        lp = model(**padded).loss
        lf = model(**flat).loss
        # Without the position ids the sequences would attend across their boundaries.
        lx = model(input_ids=flat["input_ids"], labels=flat["labels"], use_cache=False).loss
    assert lf.item() == pytest.approx(lp.item(), abs=1e-5)
    assert abs(lx.item() - lp.item()) > 1e-4


def test_padding_free_refuses_example_labels(llama):
    from peftkit.errors import UserError

    tok, _ = llama
    with pytest.raises(UserError, match="train.padding_free"):
        PaddingFree()([{"input_ids": [1, 2, 3], "labels": 1}])


class _LM:
    """A minimal causal-LM task (the real one lives in peftkit.tasks when present)."""

    kind = "causal_lm"
    primary_metric = "loss"

    def __init__(self, tok):
        import datasets

        self.tok = tok
        texts = [TEXTS[i % 4] + " " + TEXTS[(i * 3) % 4] for i in range(24)]
        self.ds = datasets.Dataset.from_list(_features(tok, texts))

    def datasets(self):
        return {"train": self.ds, "validation": self.ds, "test": self.ds}

    def collate(self, features):
        return _padded(self.tok, features)

    def eval_step(self, model, batch):
        return [model(**batch).loss.item()] * len(batch["input_ids"]), [0] * len(batch["input_ids"])

    def metrics(self, preds, refs):
        return {"loss": sum(preds) / len(preds)}

    def info(self):
        return {}


def test_trainer_padding_free_trains_like_padded(tiny_models, sentiment_dir, tmp_path):
    from accelerate.state import AcceleratorState
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import tiny_recipe
    from peftkit import recipe as R
    from peftkit import strategies
    from peftkit.build import Built
    from peftkit.trainer import Trainer

    tok = AutoTokenizer.from_pretrained(tiny_models["llama"])
    weights = {}
    try:
        for pf in (False, True):
            rec = R.from_dict(tiny_recipe(tiny_models["llama"], sentiment_dir, "lora", max_steps=3, batch_size=8,
                                          padding_free=pf, lr=1e-2))
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], attn_implementation="sdpa",
                                                         dtype=torch.float32)
            strategy = strategies.get(rec.strategy)
            model = strategy.apply(model, [])
            built = Built(rec, _LM(tok), strategy, model, tok, [], {"name": "tiny-llama"}, 0.0)
            res = Trainer(built, tmp_path / f"pf{pf}").fit()
            assert res["speed"]["steps"] == 3
            weights[pf] = {k: v.clone() for k, v in strategy.state_dict(model).items()}
    finally:
        AcceleratorState._reset_state(True)
    assert weights[True].keys() == weights[False].keys()
    for k in weights[True]:
        assert torch.allclose(weights[True][k], weights[False][k], atol=1e-5), k
    assert any(weights[True][k].abs().sum() > 0 for k in weights[True] if "lora_B" in k)  # it did train
