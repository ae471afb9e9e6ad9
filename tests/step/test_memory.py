import pytest
import torch

from conftest import tiny_recipe
from peftkit.step import memory
from peftkit import recipe as R
from torch.utils._python_dispatch import _get_current_dispatch_mode


def test_tracker_counts_known_sizes_exactly():
    m = memory.LiveMemory()
    with m:
        a = torch.empty(1000)  # 4000 B
        b = torch.empty(250, dtype=torch.float64)  # 2000 B
        v = a.view(10, 100)  # a view: no new storage
        a.add_(1)  # in place: no new storage
        assert (m.current, m.peak) == (6000, 6000)
        del a
        assert m.current == 6000  # the view keeps the storage alive
        del v
        assert (m.current, m.peak) == (2000, 6000)
        c = torch.empty(3000, dtype=torch.uint8)
        d = b * 2  # a new 2000 B result
        assert (m.current, m.peak) == (7000, 7000)
        del b, c, d
    assert (m.current, m.peak) == (0, 7000)
    assert m.peak_by == {"weights": 0, "gradients": 0, "optimizer": 0, "activations": 7000, "temporaries": 0}


def test_tracker_rounds_blocks_and_sees_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        m = memory.LiveMemory(round_to=512)
        with m:
            x = torch.empty(1, dtype=torch.float32)  # 4 B -> one 512 B block
            y = torch.empty(1000)  # 4000 B -> 4096 B
        assert m.current == 512 + 4096
        del x, y
    assert m.current == 0 and m.peak == 512 + 4096


def test_tracker_splits_a_step_by_category():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)  # 64*32*4 + 32*4 = 8320 B of weights
    opt = torch.optim.AdamW(lin.parameters(), foreach=False)
    x = torch.randn(16, 64)
    lin(x).sum().backward()
    opt.step()  # warm-up: optimizer state exists (2 x 8320 B + two 4 B steps)
    opt.zero_grad(set_to_none=True)
    m = memory.LiveMemory()
    handles = memory.track_state(m, lin, opt)
    assert m.by["weights"] == 8320 and m.by["optimizer"] == 2 * 8320 + 2 * 4 and m.by["gradients"] == 0
    with m:
        y = lin(x)  # 16 x 32 x 4 B output: an activation
        assert m.by["activations"] == 2048
        y.sum().backward()
        assert m.by["gradients"] == 8320  # .grad re-labelled as it was accumulated
        opt.step()
        opt.zero_grad(set_to_none=True)
    for h in handles:
        h.remove()
    assert m.by["gradients"] == 0 and m.peak_by["gradients"] == 8320
    assert m.peak == sum(m.peak_by.values()) and m.peak >= 8320 * 4 + 8 + 2048


def test_step_peak_tracks_only_its_step():
    lin = torch.nn.Linear(8, 8)
    opt = torch.optim.SGD(lin.parameters())
    probe = memory.StepPeak(at=2)
    for step in (1, 2, 3):
        with probe.around(step, lin, opt, (4, 8)):
            assert (_get_current_dispatch_mode() is not None) == (step == 2)
            lin(torch.randn(4, 8)).sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    r = probe.result
    assert r["step"] == 2 and r["batch_shape"] == [4, 8]
    assert r["at_peak"]["weights"] == (64 + 8) * 4 and r["peak_bytes"] >= r["start_bytes"]


def _built(tiny_models, sentiment_dir, kind, strategy, **train):
    from peftkit.model.build import build

    return build(R.from_dict(tiny_recipe(tiny_models[kind], sentiment_dir, strategy, **train)))


def test_full_accounting_is_exact(tiny_models, sentiment_dir):
    b = _built(tiny_models, sentiment_dir, "bert", "full")
    n = sum(p.numel() for p in b.model.parameters())
    opt = torch.optim.AdamW(b.model.parameters(), foreach=True)
    ids = torch.randint(1000, 2000, (4, 12))
    b.model(input_ids=ids, labels=torch.zeros(4, dtype=torch.long)).loss.backward()
    opt.step()
    by = memory.optimizer_bytes(opt)["by_state"]
    # AdamW keeps exp_avg and exp_avg_sq in fp32 for every trainable parameter.
    assert by["exp_avg"] + by["exp_avg_sq"] == 2 * 4 * n
    assert memory.weight_bytes(b.model)["by_type"]["float32"] == 4 * n


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


@pytest.mark.parametrize("upcast", [True, False])
def test_qlora_keeps_unquantized_weights_in_model_dtype_unless_upcast(tiny_models, sentiment_dir, upcast):
    d = tiny_recipe(tiny_models["llama"], sentiment_dir, "qlora", precision="bf16")
    d["model"].update(dtype="bf16", compute_dtype="bf16")
    d["strategy"]["upcast_unquantized"] = upcast
    from peftkit.model.build import build

    b = build(R.from_dict(d))
    inner = b.model.get_base_model()
    dtypes = {inner.model.embed_tokens.weight.dtype, inner.model.norm.weight.dtype}
    assert dtypes == ({torch.float32} if upcast else {torch.bfloat16})  # peft's k-bit preparation casts them
    assert "nf4(4bit packed)" in memory.weight_bytes(b.model)["by_type"]
