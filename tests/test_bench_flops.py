"""benchmarks/flops.py counts what torch's own FLOP counter sees (eager attention, tiny BERT)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import flops  # noqa: E402


def _model(tiny_models, strategy):
    from transformers import AutoModelForSequenceClassification

    from peftkit import strategies

    m = AutoModelForSequenceClassification.from_pretrained(tiny_models["bert"], num_labels=2,
                                                           attn_implementation="eager")
    cfg = strategies.REGISTRY[strategy].Config()
    return strategies.get(cfg).apply(m, ["classifier"])


def test_counter_matches_torch_flop_counter(tiny_models):
    from torch.utils.flop_counter import FlopCounterMode

    ids = torch.randint(1000, 2000, (4, 12))
    mask = torch.ones_like(ids)
    mask[:, 9:] = 0
    for strategy in ("full", "lora"):
        model = _model(tiny_models, strategy)
        counter = flops.FlopCounter(model)
        with FlopCounterMode(display=False) as ref:
            model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 0, 1])).loss.backward()
        counter.close()
        assert counter.flops == pytest.approx(ref.get_total_flops(), rel=1e-6), strategy


@pytest.mark.slow
@pytest.mark.parametrize("script", ["mfu.py", "vs_hf_trainer.py"])
def test_benchmark_smoke(script):
    """The benchmark scripts run end to end on a tiny model (--smoke writes nothing)."""
    import os
    import subprocess

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    p = subprocess.run([sys.executable, str(root / "benchmarks" / script), "--smoke"], capture_output=True, text=True,
                       env=env, timeout=1200, cwd=root)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "| strategy" in p.stdout or "| setting" in p.stdout
