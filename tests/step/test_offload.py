"""train.activation_offloading: the hooks keep gradients exact; the estimate drops what they send away."""

import pytest
import torch
from conftest import gen_recipe, instr_dir  # noqa: F401  (fixture)

from peftkit.step import offload
from peftkit import recipe as R
from peftkit.errors import UserError


def _tiny_checkpointed(tiny_models):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def test_offload_hooks_keep_loss_and_gradients_and_move_the_layer_inputs(tiny_models, monkeypatch):
    model = _tiny_checkpointed(tiny_models)
    ids = torch.randint(1, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}

    def run(ctx):
        model.zero_grad(set_to_none=True)
        with ctx:
            loss = model(**batch).loss
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}

    from contextlib import nullcontext

    ref = run(nullcontext())
    monkeypatch.setattr(offload, "MIN_BYTES", 1024)  # the tiny model's layer inputs are 6 KiB
    moved, stays = [], offload.stays
    monkeypatch.setattr(offload, "stays", lambda t: stays(t) or moved.append(t.shape))
    got = run(offload.hooks())
    assert got[0] == pytest.approx(ref[0], abs=1e-6)
    for n in ref[1]:
        torch.testing.assert_close(got[1][n], ref[1][n], rtol=0, atol=0, msg=n)
    hidden = torch.Size([2, 24, 32])
    # each checkpointed layer's input went to the host, and no weight did (linears save them, transposed)
    assert sum(s == hidden for s in moved) >= model.config.num_hidden_layers
    weights = {p.shape for p in model.parameters()} | {p.t().shape for p in model.parameters() if p.ndim == 2}
    assert not weights & set(moved)


def test_parameters_and_small_tensors_stay():
    w = torch.nn.Parameter(torch.empty(1024, 1024))
    assert offload.stays(w) and offload.stays(w.t()) and offload.stays(torch.empty(10))
    assert not offload.stays(torch.empty(512, 1024))


def test_estimate_with_offloading_drops_the_checkpointed_layer_inputs(tiny_models, instr_dir, monkeypatch):  # noqa: F811
    from peftkit.estimate.trace import estimate

    monkeypatch.setattr(offload, "MIN_BYTES", 1024)
    batch, seq, hidden, layers = 4, 256, 32, 2
    peaks = {}
    for off in (False, True):
        d = gen_recipe(tiny_models["llama"], instr_dir, task={"max_length": seq, "loss_chunk_tokens": 64},
                       activation_offloading=off)
        d["model"]["gradient_checkpointing"] = True
        peaks[off] = estimate(R.from_dict(d), batch_size=batch, seq_len=seq, device="cuda")
    saved = peaks[False]["peak_bytes"] - peaks[True]["peak_bytes"]
    layer_input = batch * seq * hidden * 4  # fp32
    assert saved >= layers * layer_input, (saved, peaks[False]["at_peak"], peaks[True]["at_peak"])


def test_offloading_is_refused_off_cuda(tiny_models, instr_dir, tmp_path):  # noqa: F811
    from peftkit.model.build import build
    from peftkit.estimate.trace import estimate
    from peftkit.training.trainer import Trainer

    r = R.from_dict(gen_recipe(tiny_models["llama"], instr_dir, activation_offloading=True))
    with pytest.raises(UserError, match="train.activation_offloading: a CUDA feature .* --device cuda"):
        estimate(r, device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="train.activation_offloading: needs a CUDA device .* trains on cpu"):
            Trainer(build(r), tmp_path / "run")
