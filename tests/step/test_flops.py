"""peftkit.step.flops: model FLOPs of training, checked against torch's own FLOP counter
(what really executes) on unpadded batches, and its conventions (real tokens, pooled head
rows, causal attention half, backward only where gradients flow) on the rest."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from peftkit.step import flops
from peftkit.step.flops import FlopCounter


def _cls(tiny_models, strategy="full", kind="bert", **cfg):
    from transformers import AutoModelForSequenceClassification

    from peftkit import strategies

    m = AutoModelForSequenceClassification.from_pretrained(tiny_models[kind], num_labels=2, attn_implementation="eager")
    head = "classifier" if kind == "bert" else "score"
    return strategies.get(strategies.REGISTRY[strategy].Config(**cfg)).apply(m, [head]).train()


def _lm(tiny_models, kind, strategy="full"):
    from transformers import AutoModelForCausalLM

    from peftkit import strategies

    m = AutoModelForCausalLM.from_pretrained(tiny_models[kind], attn_implementation="eager")
    return strategies.get(strategies.REGISTRY[strategy].Config()).apply(m, []).train()


def _step(model, ids, mask=None, labels=None, **kw):
    """(peftkit FLOPs, FlopCounterMode) of one forward + backward."""
    labels = torch.arange(ids.shape[0]) % 2 if labels is None else labels
    with FlopCounter(model) as counter, FlopCounterMode(display=False) as ref:
        model(input_ids=ids, attention_mask=mask, labels=labels, **kw).loss.backward()
        ours = counter.take()
    model.zero_grad(set_to_none=True)
    return ours, ref


def _forward_only(model, ids):
    with torch.no_grad(), FlopCounterMode(display=False) as ref:
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return ref.get_total_flops()


IDS = torch.randint(1000, 2000, (4, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("strategy,cfg", [("full", {}), ("lora", {}), ("lora", {"target_modules": ["query", "value"]}),
                                          ("freeze", {"layers": -1}), ("ia3", {}), ("adapter", {}), ("bitfit", {}),
                                          ("prefix", {"num_virtual_tokens": 4})])
def test_equals_torch_flop_counter_unpadded(tiny_models, strategy, cfg):
    """Exact on tiny BERT (eager attention): pooled head on B rows, frozen parts below the
    lowest trainable parameter forward only, extra matmuls of each strategy, partial
    attention backward (LoRA on q,v only: no dK in the first layer)."""
    torch.manual_seed(0)
    model = _cls(tiny_models, strategy, **cfg)
    ours, ref = _step(model, IDS, torch.ones_like(IDS))
    assert ours == pytest.approx(ref.get_total_flops(), rel=1e-6)


def test_backward_stops_at_lowest_trainable(tiny_models):
    torch.manual_seed(0)
    fwd = _forward_only(_cls(tiny_models, "full"), IDS)
    total = {s: _step(_cls(tiny_models, s, **c), IDS, torch.ones_like(IDS))[0]
             for s, c in [("full", {}), ("lora", {"r": 2}), ("freeze", {"layers": -1})]}
    back = {s: t - fwd for s, t in total.items()}
    assert back["full"] == pytest.approx(2 * fwd, rel=1e-6)  # 6N: backward = 2 x forward
    # LoRA: no weight gradients of frozen weights (its A/B matmuls, 1/8 of the base at r=2 on
    # this 32-wide model, are in `back` too); freeze: nothing at all below the trained top block.
    assert back["lora"] < 0.75 * back["full"] and back["freeze"] < 0.75 * back["full"]


def test_padding_is_not_counted(tiny_models):
    """A padded batch counts what its sequences cost unpadded, one by one."""
    torch.manual_seed(0)
    model = _cls(tiny_models, "lora")
    lens = [12, 9, 5, 2]
    mask = (torch.arange(12)[None, :] < torch.tensor(lens)[:, None]).long()
    padded, ref = _step(model, IDS, mask)
    alone = sum(_step(model, IDS[i:i + 1, :n], torch.ones(1, n, dtype=torch.long), torch.tensor([0]))[0]
                for i, n in enumerate(lens))
    assert padded == pytest.approx(alone, rel=1e-9)
    assert padded < 0.75 * ref.get_total_flops()  # FlopCounterMode counts the padding too


def test_reused_coefficients_match_per_call_counting(tiny_models):
    """After the first step the per-layer hooks go; later batches of other shapes and padding
    count the same as a per-call counter (and as a fresh one)."""
    torch.manual_seed(0)
    model = _cls(tiny_models, "lora", target_modules=["query", "value"])
    batches = [(IDS, torch.ones_like(IDS)), (IDS[:3, :7], torch.ones(3, 7, dtype=torch.long)),
               (IDS[:2], (torch.arange(12)[None, :] < torch.tensor([[12], [4]])).long())]
    fresh = [_step(model, ids, mask)[0] for ids, mask in batches]
    kept, per_call = FlopCounter(model), FlopCounter(model, reuse=False)
    for (ids, mask), f in zip(batches, fresh):
        model(input_ids=ids, attention_mask=mask, labels=torch.arange(ids.shape[0]) % 2).loss.backward()
        a, b = kept.take(), per_call.take()
        assert a == pytest.approx(b, rel=1e-9) and a == pytest.approx(f, rel=1e-9)
    assert not kept._handles and per_call._handles
    kept.close(), per_call.close()


def _matmul_split(ref):
    """(linear, attention) FLOPs of a FlopCounterMode run with eager attention (attention = bmm)."""
    g = {str(k): v for k, v in ref.get_flop_counts()["Global"].items()}
    att = sum(v for k, v in g.items() if "bmm" in k)
    return ref.get_total_flops() - att, att


@pytest.mark.parametrize("kind,strategy", [("gpt2", "full"), ("gpt2", "lora"), ("llama", "full"), ("phi3", "lora")])
def test_causal_lm_conv1d_and_causal_half(tiny_models, kind, strategy):
    """GPT-2's Conv1D and the LM head (per token) count exactly; causal attention counts the
    query-key pairs at or before the query, (s+1)/2s of the full square torch executes."""
    torch.manual_seed(0)
    model = _lm(tiny_models, kind, strategy)
    with FlopCounter(model) as counter, FlopCounterMode(display=False) as ref:
        model(input_ids=IDS, attention_mask=torch.ones_like(IDS), labels=IDS).loss.backward()
        counter.take()
    linear, att = _matmul_split(ref)
    s = IDS.shape[1]
    assert counter.linear == pytest.approx(linear, rel=1e-9)
    assert counter.attention == pytest.approx(att * (s + 1) / (2 * s), rel=1e-9)


def _tiny_encoder(family: str):
    """A tiny random encoder of a family that peftkit.arch has no entry for."""
    import transformers

    common = dict(vocab_size=3000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=128, num_labels=2, attn_implementation="eager", pad_token_id=0)
    if family == "modernbert":
        cfg = transformers.ModernBertConfig(**common, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
        return transformers.ModernBertForSequenceClassification(cfg)
    return transformers.CamembertForSequenceClassification(transformers.CamembertConfig(**common))


@pytest.mark.parametrize("family", ["modernbert", "camembert"])
def test_encoder_without_a_table_entry_is_not_causal(family):
    """An encoder peftkit.arch does not list is recognised as one (transformers' masked-LM
    mapping): its attention counts every query-key pair, as torch executes, not the causal half."""
    torch.manual_seed(0)
    model = _tiny_encoder(family).train()
    with FlopCounter(model) as counter, FlopCounterMode(display=False) as ref:
        model(input_ids=IDS % 3000, attention_mask=torch.ones_like(IDS), labels=torch.tensor([0, 1, 0, 1])).loss.backward()
        counter.take()
    linear, att = _matmul_split(ref)
    assert counter.linear == pytest.approx(linear, rel=1e-9)
    assert counter.attention == pytest.approx(att, rel=1e-9)


def test_padding_free_batch_counts_each_sequence(tiny_models):
    """One packed row (positions restart at 0) costs what its sequences cost one by one."""
    torch.manual_seed(0)
    model = _lm(tiny_models, "llama")
    lens = [7, 3, 2]
    ids = IDS[0, :sum(lens)][None]
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    packed, _ = _step(model, ids, None, ids, position_ids=pos)
    alone, at = 0.0, 0
    for n in lens:
        alone += _step(model, ids[:, at:at + n], torch.ones(1, n, dtype=torch.long), ids[:, at:at + n])[0]
        at += n
    assert packed == pytest.approx(alone, rel=1e-9)


def test_recomputation_and_eval_not_counted(tiny_models):
    torch.manual_seed(0)
    model = _cls(tiny_models, "full")
    plain, _ = _step(model, IDS, torch.ones_like(IDS))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    recomputed, ref = _step(model, IDS, torch.ones_like(IDS))
    assert recomputed == pytest.approx(plain, rel=1e-9)
    assert recomputed < ref.get_total_flops()  # torch counts the recomputed forwards too
    with FlopCounter(model) as counter, torch.no_grad():
        model(input_ids=IDS)
        assert counter.take() == 0.0


def test_qlora_4bit_linears(tiny_models, sentiment_dir):
    """bitsandbytes' Linear4bit is an nn.Linear: counted unpacked and frozen, as LoRA's base."""
    bnb = pytest.importorskip("bitsandbytes")
    from conftest import tiny_recipe

    from peftkit import recipe as R
    from peftkit.model.build import build

    def count(strategy):
        try:
            model = build(R.from_dict(tiny_recipe(tiny_models["bert"], sentiment_dir, strategy))).model.train()
        except Exception as e:  # a bitsandbytes build without 4-bit support on this device
            pytest.skip(f"{strategy} unavailable here: {e}")
        return model, _step(model, IDS, torch.ones_like(IDS))[0]

    q, fq = count("qlora")
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in q.modules())
    assert fq == pytest.approx(count("lora")[1], rel=1e-9)  # same matmuls, whatever the storage


def test_trainer_reports_model_flops(tiny_models, sentiment_dir, tmp_path):
    from conftest import tiny_recipe

    from peftkit import recipe as R
    from peftkit.model.build import build
    from peftkit.training.trainer import Trainer

    res = Trainer(build(R.from_dict(tiny_recipe(tiny_models["bert"], sentiment_dir, "full"))), tmp_path).fit()
    sp = res["speed"]
    assert sp["model_flops_per_s"] > 0 and sp["model_flops_per_token"] > 0
    # Full fine-tuning of tiny BERT: 6 x (2 layers x 8192 matmul weights) per token, plus attention.
    assert 6 * 2 * 8192 < sp["model_flops_per_token"] < 1.3 * 6 * 2 * 8192


def test_mfu_and_peak():
    assert flops.mfu(50.0, 100.0) == 0.5 and flops.mfu(None, 100.0) is None
    assert flops.matmul_peak_flops("cpu", torch.float32, n=64, iters=2, warmup=1) > 0
