"""Prefix tuning: exactness against real past keys/values, padding, gradients, save/load, CLI."""

import json
import math

import pytest
import torch
import yaml
from conftest import run_cli, tiny_recipe
from transformers import AttentionInterface, AutoModel, AutoModelForSequenceClassification
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

from peftkit import recipe as R
from peftkit.errors import RecipeError, UserError
from peftkit.strategies import count_params
from peftkit.strategies.prefix import Prefix, PrefixConfig, PrefixEncoder, find_encoder

KINDS = ("bert", "llama", "gpt2")
CAPTURED: dict = {}


def _capture(module, query, key, value, mask, **kw):
    CAPTURED[module] = (key.detach().clone(), value.detach().clone())
    return sdpa_attention_forward(module, query, key, value, mask, **kw)


AttentionInterface.register("test_capture", _capture)
AttentionMaskInterface.register("test_capture", sdpa_mask)


def _apply(model, head=(), **cfg):
    s = Prefix(PrefixConfig(**cfg))
    return s, s.apply(model, list(head))


def _check_equals_real_past(model, impl, first_position=0):
    P, S = 5, 7
    model.eval()
    ids = torch.randint(1000, 2000, (2, P + S), generator=torch.Generator().manual_seed(0))
    CAPTURED.clear()
    model.set_attn_implementation("test_capture")
    with torch.no_grad():
        full = model(input_ids=ids).last_hidden_state
    model.set_attn_implementation(impl)
    _, model = _apply(model, num_virtual_tokens=P)
    assert model.config._attn_implementation == f"peftkit_prefix_{impl}"
    _, enc = find_encoder(model)
    slots = [(m, m._peftkit_prefix.index) for m in model.modules() if hasattr(m, "_peftkit_prefix")]
    assert len(slots) == 2 and sorted(i for _, i in slots) == [0, 1]
    with torch.no_grad():
        for m, i in slots:
            k, v = CAPTURED[m]  # (batch, kv_heads, P+S, head_dim); both rows share the prefix below
            enc.table[i, 0] = k[0, :, :P]
            enc.table[i, 1] = v[0, :, :P]
        pos = torch.arange(P, P + S).expand(1, -1) + first_position
        out = model(input_ids=ids[:1, P:], position_ids=pos).last_hidden_state
    torch.testing.assert_close(out, full[:1, P:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", KINDS)
def test_prefix_equals_real_past_key_values(tiny_models, kind, impl):
    """A prefix set to the keys/values of P real tokens gives exactly the outputs of the
    last S tokens of the full P+S sequence: concatenation order, masks (causal and not),
    grouped-query heads (llama: 2 kv heads, 4 query heads) and layer order all line up."""
    _check_equals_real_past(AutoModel.from_pretrained(tiny_models[kind], attn_implementation=impl), impl)


@pytest.mark.parametrize("kind", ["roberta", "mistral", "qwen2"])
def test_other_supported_architectures(kind):
    import transformers

    cfg = {"roberta": transformers.RobertaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config}[kind](
        vocab_size=2048, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=128, pad_token_id=0)
    torch.manual_seed(0)
    # RoBERTa numbers positions from padding_idx + 1; the others from 0.
    first = cfg.pad_token_id + 1 if kind == "roberta" else 0
    _check_equals_real_past(AutoModel.from_config(cfg, attn_implementation="sdpa"), "sdpa", first)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", KINDS)
def test_padded_batch_matches_rows_one_by_one(tiny_models, kind, impl):
    model = AutoModel.from_pretrained(tiny_models[kind], attn_implementation=impl).eval()
    _apply(model, num_virtual_tokens=4)
    rows = [torch.arange(1000, 1005), torch.arange(1100, 1109)]
    n = max(len(r) for r in rows)
    left = kind != "bert"  # decoders: left padding, so real tokens would see pads if unmasked
    ids = torch.zeros(len(rows), n, dtype=torch.long)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for b, r in enumerate(rows):
        sl = slice(n - len(r), n) if left else slice(0, len(r))
        ids[b, sl], mask[b, sl] = r, 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
        for b, r in enumerate(rows):
            one = model(input_ids=r[None]).last_hidden_state[0]
            sl = slice(n - len(r), n) if left else slice(0, len(r))
            torch.testing.assert_close(batch[b, sl], one, atol=1e-5, rtol=1e-5)
    assert not torch.isnan(batch).any()


@pytest.mark.parametrize("reparameterize", [False, True])
@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_only_prefix_and_head_train_and_get_gradients(tiny_models, kind, reparameterize):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_models[kind], num_labels=2)
    head = ["classifier"] if kind == "bert" else ["score"]
    _, model = _apply(model, head, num_virtual_tokens=3, reparameterize=reparameterize, hidden=8)
    _, enc = find_encoder(model)
    own = {id(p) for p in enc.parameters()} | {id(p) for p in model.get_submodule(head[0]).parameters()}
    assert {id(p) for p in model.parameters() if p.requires_grad} == own
    trainable, total = count_params(model)
    assert trainable == sum(p.numel() for p in model.parameters() if id(p) in own) and trainable < total
    ids = torch.randint(1000, 2000, (2, 6))
    model(input_ids=ids, labels=torch.tensor([0, 1])).loss.backward()
    for p in enc.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters() if id(p) not in own)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_prefix_alone_reduces_loss(tiny_models, kind):
    """Backbone and head frozen: only the prefix can move every prediction towards one class."""
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_models[kind], num_labels=2)
    with torch.no_grad():  # a unit-scale random head, so that features can move the logits
        model.get_submodule("classifier" if kind == "bert" else "score").weight.normal_()
    _, model = _apply(model, [], num_virtual_tokens=4)
    model.eval()  # no dropout: the loss is a deterministic function of the prefix
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-1)
    ids, labels = torch.randint(1000, 2000, (8, 6)), torch.ones(8, dtype=torch.long)
    losses = []
    for _ in range(20):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_gradient_checkpointing_and_reparameterized_mlp(tiny_models):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_models["llama"], num_labels=2)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _, model = _apply(model, ["score"], num_virtual_tokens=3, reparameterize=True, hidden=8)
    model.train()
    model(input_ids=torch.randint(1000, 2000, (2, 6)), labels=torch.tensor([0, 1])).loss.backward()
    _, enc = find_encoder(model)
    assert enc.embedding.grad.abs().sum() > 0 and enc.mlp[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("reparameterize", [False, True])
def test_save_fresh_apply_load_reproduces_logits(tiny_models, reparameterize):
    def fresh(seed):
        torch.manual_seed(seed)
        m = AutoModelForSequenceClassification.from_pretrained(tiny_models["llama"], num_labels=2)
        return _apply(m, ["score"], num_virtual_tokens=4, reparameterize=reparameterize, hidden=8)

    s, a = fresh(0)
    with torch.no_grad():
        for p in a.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)  # as if trained
    sd = s.state_dict(a)
    name, enc = find_encoder(a)
    assert set(sd) == {f"{name}.table", "score.weight"} and sd[f"{name}.table"].shape == enc.shape
    s2, b = fresh(1)
    ids = torch.randint(1000, 2000, (3, 7))
    a.eval(), b.eval()
    with torch.no_grad():
        assert not torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)
        s2.load_state_dict(b, sd)
        torch.testing.assert_close(b(input_ids=ids).logits, a(input_ids=ids).logits, atol=0, rtol=0)
    assert find_encoder(b)[1].mlp is None  # loaded prefixes are the plain table
    with pytest.raises(ValueError, match="prefix table"):
        s2.load_state_dict(b, {"score.weight": sd["score.weight"]})


def test_check_rejects_unsupported_architectures(tmp_path, tiny_models, sentiment_dir):
    t5 = tmp_path / "t5"
    t5.mkdir()
    (t5 / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(RecipeError, match="strategy 'prefix' supports model types .*this model is 't5'"):
        R.from_dict(tiny_recipe(t5, sentiment_dir, "prefix"))
    bad = tiny_recipe(tiny_models["bert"], sentiment_dir, "prefix")
    bad["model"]["attn_implementation"] = "flash_attention_2"
    with pytest.raises(RecipeError, match="flash_attention_2"):
        R.from_dict(bad)
    for kind in KINDS:
        R.from_dict(tiny_recipe(tiny_models[kind], sentiment_dir, "prefix"))
    t5_model = type("T", (torch.nn.Module,), {})()
    t5_model.config = type("C", (), {"get_text_config": lambda self: type("X", (), {"model_type": "t5"})()})()
    with pytest.raises(UserError, match="this model is 't5'"):
        Prefix(PrefixConfig()).apply(t5_model, [])


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_cli_train_end_to_end(tiny_models, sentiment_dir, tmp_path, kind):
    rec = tmp_path / "r.yaml"
    r = tiny_recipe(tiny_models[kind], sentiment_dir, "prefix", max_steps=6, lr=1e-2, log_every=2)
    r["strategy"].update(num_virtual_tokens=8, reparameterize=kind == "llama", hidden=16)
    rec.write_text(yaml.safe_dump(r))
    out = tmp_path / "run"
    p = run_cli("train", str(rec), "--out", str(out))
    assert p.returncode == 0, p.stderr
    res = json.loads((out / "result.json").read_text())
    assert res["run"]["strategy"] == "prefix" and res["params"]["can_merge"] is False
    assert 0 < res["params"]["trainable"] < res["params"]["total"]
    from safetensors.torch import load_file

    sd = load_file(out / "strategy.safetensors")
    table = [t for k, t in sd.items() if k.endswith(".table")]
    kv_heads = 2 if kind == "llama" else 4
    assert len(table) == 1 and tuple(table[0].shape) == (2, 2, kv_heads, 8, 8)
    losses = [r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]
    # Finite, and moving: a prefix that got no gradient would leave the same loss every window.
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses) and len(set(losses)) == 3


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_decoding_with_cache_matches_full_forward(tiny_models, kind):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models[kind]).eval()
    _apply(model, num_virtual_tokens=3)
    ids = torch.randint(1000, 2000, (2, 9))
    with torch.no_grad():
        full = model(input_ids=ids).logits[:, -3:]
        out = model(input_ids=ids[:, :6], use_cache=True)  # prefill, then 2 tokens, then 1
        two = model(input_ids=ids[:, 6:8], cache=out.cache, use_cache=True)
        one = model(input_ids=ids[:, 8:], cache=two.cache, use_cache=True)
    torch.testing.assert_close(torch.cat([two.logits, one.logits], 1), full, atol=1e-5, rtol=1e-5)


def test_extend_mask_shapes_and_values():
    from peftkit.strategies.prefix import _extend_mask

    q = torch.zeros(1, 2, 3, 4)
    m = _extend_mask(None, 2, q, kv_len=5, causal=True, additive=False)  # 2 cached + 3 new tokens
    assert m.dtype == torch.bool and m.shape == (1, 1, 3, 7)
    assert m[0, 0].tolist() == [[True] * 2 + [True] * 3 + [False] * 2,
                                [True] * 2 + [True] * 4 + [False],
                                [True] * 7]
    f = _extend_mask(None, 2, q, kv_len=5, causal=True, additive=True)
    assert f.dtype == q.dtype and torch.equal(f == 0, m)
    assert _extend_mask(None, 2, q, kv_len=3, causal=False, additive=False) is None
    assert _extend_mask(None, 2, q[:, :, :1], kv_len=3, causal=True, additive=True) is None
    pad = torch.tensor([True, True, False]).expand(2, 1, 3, 3)
    assert _extend_mask(pad, 2, q, 3, True, False)[0, 0, 0].tolist() == [True, True, True, True, False]
    fm = torch.zeros(2, 1, 3, 3).masked_fill(~pad, -1e9)
    assert _extend_mask(fm, 2, q, 3, True, True)[1, 0, 2].tolist() == [0, 0, 0, 0, -1e9]


def test_padding_free_packed_row_matches_sequences_alone(tiny_models):
    """train.padding_free: one row, restarting position_ids, no mask -> block-diagonal mask."""
    model = AutoModel.from_pretrained(tiny_models["llama"], attn_implementation="sdpa").eval()
    _apply(model, num_virtual_tokens=3)
    a, b = torch.arange(1000, 1004), torch.arange(1100, 1106)
    pos = torch.cat([torch.arange(4), torch.arange(6)])[None]
    with torch.no_grad():
        packed = model(input_ids=torch.cat([a, b])[None], position_ids=pos, use_cache=False).last_hidden_state[0]
        alone = [model(input_ids=x[None]).last_hidden_state[0] for x in (a, b)]
    torch.testing.assert_close(packed, torch.cat(alone), atol=1e-5, rtol=1e-5)
