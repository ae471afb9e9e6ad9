"""task.loss_chunk_tokens: transformers' causal-LM loss and gradients, without the full logits."""

import pytest
import torch
from conftest import gen_recipe, instr_dir  # noqa: F401  (fixture)

from peftkit import recipe as R
from peftkit.step.chunked_loss import causal_lm_loss
from peftkit.errors import UserError
from peftkit.step.packing import PaddingFree


def _batch(vocab: int) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (3, 13), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt
    labels[2, 9:] = -100  # padding
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _loss_and_grads(model, fn):
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _same(a, b):
    (la, ga), (lb, gb) = a, b
    assert la.item() == pytest.approx(lb.item(), rel=1e-5, abs=1e-6)
    assert ga.keys() == gb.keys() and ga
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "phi3"])
def test_chunked_loss_equals_transformers_loss_and_gradients(tiny_models, kind):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models[kind]).eval()  # eval: no dropout
    b = _batch(model.config.vocab_size)
    ref = _loss_and_grads(model, lambda: model(**b).loss)
    for chunk in (5, 39, 1000):  # uneven, exact and larger than the batch's 39 positions
        _same(_loss_and_grads(model, lambda: causal_lm_loss(model, b, chunk)), ref)


def test_chunked_loss_under_lora_padding_free_and_checkpointing(tiny_models):
    import peft
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "lm_head"]))
    model.train()
    b = _batch(1000)
    feats = [{"input_ids": b["input_ids"][i][b["attention_mask"][i] == 1].tolist(),
              "labels": b["labels"][i][b["attention_mask"][i] == 1].tolist()} for i in range(3)]
    flat = PaddingFree()(feats)
    ref = _loss_and_grads(model, lambda: model(**b).loss)
    assert any("lm_head" in n for n in ref[1])  # the LoRA on the output layer trains through the chunks
    _same(_loss_and_grads(model, lambda: causal_lm_loss(model, b, 7)), ref)
    _same(_loss_and_grads(model, lambda: causal_lm_loss(model, flat, 7)), ref)


def test_chunked_loss_refuses_a_head_it_would_change():
    from transformers import AutoModelForCausalLM, Gemma2Config

    cfg = Gemma2Config(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    model = AutoModelForCausalLM.from_config(cfg)  # its logits are soft-capped after the output layer
    with pytest.raises(UserError, match=r"task.loss_chunk_tokens: not supported for model type 'gemma2' "
                                        r"\(supported: .*llama"):
        causal_lm_loss(model, _batch(100), 8)


def test_recipe_refuses_chunked_loss_under_fsdp(tiny_models, instr_dir, monkeypatch):  # noqa: F811
    from peftkit.errors import RecipeError

    d = gen_recipe(tiny_models["llama"], instr_dir, task={"loss_chunk_tokens": 16})
    R.from_dict(d)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(RecipeError, match="task.loss_chunk_tokens: not under FSDP or DeepSpeed"):
        R.from_dict(d)


def _step_peak(b, batch):
    """Live peak of one real step after a warm-up step (as benchmarks/memory_estimate.py measures)."""
    from peftkit.step import memory
    from peftkit.step.optim import make_optimizer

    model = b.model.train()
    opt = make_optimizer(model, b.recipe.train)
    probe = memory.StepPeak(at=2)
    for step in (1, 2):
        with probe.around(step, model, opt, tuple(batch["input_ids"].shape)):
            b.task.train_loss(model, batch).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return probe.result["peak_bytes"]


def test_estimate_and_measured_step_use_the_chunked_loss(tiny_models, instr_dir):  # noqa: F811
    from peftkit.model.build import build
    from peftkit.estimate.trace import estimate

    batch, seq, vocab = 4, 64, 30522
    ids = torch.randint(1, 1000, (batch, seq), generator=torch.Generator().manual_seed(0))
    real = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    peaks = {}
    for chunk in (None, 32):
        b = build(R.from_dict(gen_recipe(tiny_models["llama"], instr_dir, task={"loss_chunk_tokens": chunk})))
        est = estimate(b.recipe, batch_size=batch, seq_len=seq, task=b.task, tokenizer=b.tokenizer)["peak_bytes"]
        live = _step_peak(b, real)
        assert abs(est - live) <= 0.10 * live, (chunk, est, live)
        peaks[chunk] = est, live
    fp32_logits = batch * seq * vocab * 4
    # transformers' loss holds several fp32 copies of the logits at once; the chunks hold a 32-row slice
    assert peaks[None][0] - peaks[32][0] > 1.5 * fp32_logits
    assert peaks[None][1] - peaks[32][1] > 1.5 * fp32_logits


def test_trainer_trains_the_same_with_the_chunked_loss(tiny_models, instr_dir, tmp_path):  # noqa: F811
    from accelerate.state import AcceleratorState

    from peftkit.model.build import build
    from peftkit.training.trainer import Trainer

    weights, start = {}, None
    try:
        for chunk in (None, 16):
            b = build(R.from_dict(gen_recipe(tiny_models["llama"], instr_dir, task={"loss_chunk_tokens": chunk},
                                             max_steps=3, batch_size=8, lr=1e-2)))
            start = {k: v.clone() for k, v in b.strategy.state_dict(b.model).items()}
            Trainer(b, tmp_path / f"c{chunk}").fit()
            weights[chunk] = {k: v.clone() for k, v in b.strategy.state_dict(b.model).items()}
    finally:
        AcceleratorState._reset_state(True)
    for k in weights[None]:
        moved = (weights[None][k] - start[k]).norm()
        # fp32; the chunks sum the loss in another order, Adam's 1/sqrt(v) can show it (cf. test_packing)
        assert (weights[16][k] - weights[None][k]).norm() <= 1e-3 * moved, k
    assert any(weights[16][k].abs().sum() > 0 for k in weights[16] if "lora_B" in k)


def test_model_flops_count_the_chunked_output_layer(tiny_models):
    from peftkit.step.flops import FlopCounter
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).train()
    ids = torch.randint(1, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    b = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    counts = []
    for fn in (lambda: model(**b).loss, lambda: causal_lm_loss(model, b, 8)):
        with FlopCounter(model, reuse=False) as counter:
            fn().backward()
            counts.append(counter.take())
    # the same useful FLOPs; chunking adds only the dropped one-position output layer (2 rows of 32)
    head = 2 * 32 * model.config.vocab_size * 3 * 2  # rows x in x out x (fwd, weight and input grads) x 2 FLOPs
    assert counts[1] == pytest.approx(counts[0] + head, rel=1e-9)
