"""The estimate (one step on fake tensors) against the measured live peak of a real step."""

import json

import pytest

from conftest import run_cli, tiny_recipe
from conftest import gen_recipe, instr_dir  # noqa: F401  (fixture)
from peftkit.estimate import fit
from peftkit import strategies
from peftkit import recipe as R
from peftkit.model.build import build
from peftkit.training.trainer import Trainer

SLOW = pytest.mark.slow  # ~25 s each on a loaded 2-core machine; every strategy stays in the default run
CASES = [("bert", s, {}, {}) for s in sorted(strategies.REGISTRY)] + [
    ("bert", "lora", {"precision": "bf16"}, {}),  # frozen weights stored in bf16 (model.frozen_dtype auto)
] + [pytest.param(*c, marks=SLOW) for c in [
    ("llama", "full", {}, {}),
    ("llama", "qlora", {}, {}),
    ("llama", "prefix", {}, {}),
    ("gpt2", "lora", {}, {}),
    ("llama", "lora", {"optimizer": "adamw8bit"}, {}),
    ("llama", "lora", {"optimizer": "paged_adamw8bit", "grad_accum": 2}, {}),
    ("bert", "full", {}, {"gradient_checkpointing": True}),
    ("llama", "lora", {"precision": "bf16"}, {"dtype": "bf16", "compute_dtype": "bf16"}),
    ("llama", "lora", {"optimizer": "adamw_foreach"}, {"quantization": "8bit"}),
]]


def _id(c):
    c = c.values if hasattr(c, "values") else c
    return "-".join([c[0], c[1], *(f"{k}={v}" for k, v in {**c[2], **c[3]}.items())])


@pytest.mark.parametrize("kind,strategy,train,model", CASES, ids=[_id(c) for c in CASES])
def test_estimate_within_10pct_of_measured_live_peak(tiny_models, sentiment_dir, tmp_path, kind, strategy,
                                                     train, model):
    d = tiny_recipe(tiny_models[kind], sentiment_dir, strategy, **train)
    d["model"].update(model)
    from accelerate.state import AcceleratorState

    try:
        res = Trainer(build(R.from_dict(d)), tmp_path / "run").fit()
    finally:
        AcceleratorState._reset_state(True)
    mem = json.loads((tmp_path / "run" / "result.json").read_text())["memory"]
    live = mem["measured"]["live"]
    assert live["step"] == 2 and mem["peak_bytes"] == live["peak_bytes"] > 0
    est = mem.get("estimate_at_measured_shape") or mem["estimate"]
    assert "error" not in est, est
    assert est["batch_size"] == live["batch_shape"][0] and est["seq_len"] == live["batch_shape"][1]
    err = mem["errors"]["estimate_vs_measured"]
    assert err == pytest.approx((est["peak_bytes"] - live["peak_bytes"]) / live["peak_bytes"])
    assert abs(err) <= 0.10, (err, est["at_peak"], live["at_peak"])
    assert res["memory"]["errors"]["weights_at_peak"] == pytest.approx(0, abs=0.01)


def test_deep_model_extrapolation_equals_the_full_trace(tiny_models, sentiment_dir, monkeypatch):
    from transformers import AutoConfig

    from peftkit.estimate import trace as E

    cfg = AutoConfig.from_pretrained(tiny_models["llama"])
    cfg.num_hidden_layers = 6
    monkeypatch.setattr(E, "_config", lambda mc: cfg)
    r = R.from_dict(tiny_recipe(tiny_models["llama"], sentiment_dir, "lora"))
    extrapolated = E.estimate(r, batch_size=4, seq_len=16)
    assert "extrapolated from traces of 2 and 3" in extrapolated["method"]
    monkeypatch.setattr(E, "EXACT_LAYERS", 99)
    full = E.estimate(r, batch_size=4, seq_len=16)
    assert "every layer traced" in full["method"]
    assert extrapolated["params"] == full["params"]
    assert extrapolated["peak_bytes"] == pytest.approx(full["peak_bytes"], rel=0.005)


def test_extrapolation_follows_the_phase_that_peaks_at_full_depth(tiny_models, instr_dir, monkeypatch):  # noqa: F811
    """Full fine-tuning with foreach AdamW: at 2-3 layers the step peaks in backward (a 100k
    vocabulary's logits), at 48 heavy layers in the optimizer step (foreach's temporary copy of
    every parameter). Extrapolating the shallow traces' peak would say -8%."""
    from transformers import AutoConfig

    from peftkit.estimate import trace as E

    cfg = AutoConfig.from_pretrained(tiny_models["llama"])
    cfg.num_hidden_layers, cfg.intermediate_size, cfg.vocab_size = 48, 4096, 100_000
    monkeypatch.setattr(E, "_config", lambda mc: cfg)
    d = gen_recipe(tiny_models["llama"], instr_dir, strategy="full", optimizer="adamw_foreach")
    est = E.Estimator(R.from_dict(d))
    shallow = [r.trace(1, 32) for r in est.runs]
    assert all(max(t["phases"], key=lambda k: t["phases"][k]["peak_bytes"]) == "backward" for t in shallow)
    extrapolated = est.at(1, 32)
    monkeypatch.setattr(E, "EXACT_LAYERS", 99)
    full = E.estimate(R.from_dict(d), batch_size=1, seq_len=32)
    assert max(full["phases"], key=lambda k: full["phases"][k]["peak_bytes"]) == "optimizer"
    assert extrapolated["peak_bytes"] == pytest.approx(full["peak_bytes"], rel=0.005)
    assert extrapolated["at_peak"]["gradients"] == pytest.approx(full["at_peak"]["gradients"], rel=0.005)


def test_cuda_target_keeps_no_attention_matrix(tiny_models, sentiment_dir):
    from peftkit.estimate.trace import estimate

    d = tiny_recipe(tiny_models["llama"], sentiment_dir, "lora")
    d["model"]["attn_implementation"] = "eager"
    r = R.from_dict(d)
    cpu = [estimate(r, batch_size=2, seq_len=s)["at_peak"]["activations"] for s in (256, 512)]
    r = R.from_dict({**d, "model": {**d["model"], "attn_implementation": "sdpa"}})
    cuda = [estimate(r, batch_size=2, seq_len=s, device="cuda") for s in (256, 512)]
    assert all(e["peak_bytes"] % 512 == 0 and e["device_total_bytes"] > e["peak_bytes"] for e in cuda)
    act = [e["at_peak"]["activations"] for e in cuda]
    assert act[1] / act[0] < 2.2 < cpu[1] / cpu[0]  # O(seq) vs eager's O(seq^2) scores


def test_catalog_8b_qlora_cuda_offline_loads_no_weights(monkeypatch):
    import transformers

    from peftkit.estimate.trace import estimate

    def refuse(*a, **k):
        raise AssertionError("estimate must not load weights")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", classmethod(refuse))
    from peftkit.estimate import catalog

    r = R.load(str(catalog.HERE / "default.yaml"), ["model.name=catalog:llama-3.1-8b", "strategy.name=qlora"])
    e = estimate(r, device="cuda")
    # Llama-3.1-8B has 8,030,261,248 parameters; LoRA r8 on q,v adds 32 x (2 x 8 x (4096 + 1024)... ) = 20,971,520
    assert e["params"]["total"] - e["params"]["trainable"] == 8_030_261_248
    assert "nf4(4bit packed)" in e["weights"]["by_type"] and e["device_total_bytes"] > e["peak_bytes"] > 5 * 2**30


def test_every_catalog_entry_is_a_config():
    from peftkit.estimate import catalog

    assert len(catalog.names()) == 17
    for n in catalog.names():
        assert catalog.resolve_config(f"catalog:{n}").model_type


def test_fit_search_and_sizes():
    assert fit.parse_bytes("24GiB") == 24 * 2**30 and fit.parse_bytes("80GB") == 80 * 10**9
    calls = []

    def peak(x):
        calls.append(x)
        return 1000 + 37 * x

    assert fit._largest(peak, 5000, 16, 1, 4096) == 108 and len(calls) <= 10
    assert fit._largest(lambda x: 10 * x * x, 5000, 1000, 8, 131072, step=8) == 16
    assert fit._largest(peak, 500, 16, 1, 4096) is None and fit._largest(peak, 10**9, 16, 1, 4096) == 4096


@pytest.mark.slow  # 24 s; --fit's search is covered by the plan unit test
def test_estimate_cli_fit_and_bad_input(tiny_models, sentiment_dir, tmp_path):
    import yaml

    from peftkit.estimate.trace import estimate

    rec = tmp_path / "r.yaml"
    rec.write_text(yaml.safe_dump(tiny_recipe(tiny_models["gpt2"], sentiment_dir, "lora")))
    p = run_cli("estimate", str(rec), "strategy.name=lora", "--fit", "6MiB", "--json")
    assert p.returncode == 0, p.stderr
    (row,) = json.loads(p.stdout)
    r = R.load(str(rec), ["strategy.name=lora"])
    # largest batch whose verdict is "fits": its peak plus the stated margin within the budget
    assert estimate(r, batch_size=row["max_batch"], seq_len=32)["peak_bytes"] * (1 + fit.MARGIN) <= 6 * 2**20
    assert estimate(r, batch_size=row["max_batch"] + 1, seq_len=32)["peak_bytes"] * (1 + fit.MARGIN) > 6 * 2**20
    assert row["verdict"] in fit.VERDICTS and row["fits"] == (row["verdict"] == "fits")
    p = run_cli("estimate", str(rec), "--fit", "lots")
    assert p.returncode == 2 and "--fit" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    p = run_cli("estimate", "model.name=catalog:nope")
    assert p.returncode == 2 and "catalog" in p.stderr and len(p.stderr.strip().splitlines()) == 1
