"""The benchmark scripts run end to end on a tiny model (slow: excluded by default)."""

import sys
from pathlib import Path

import pytest


@pytest.mark.slow
@pytest.mark.parametrize("script", ["mfu.py", "vs_hf_trainer.py"])
def test_benchmark_smoke(script):
    """--smoke: tiny model and data, a few steps, nothing written."""
    import os
    import subprocess

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    p = subprocess.run([sys.executable, str(root / "benchmarks" / script), "--smoke"], capture_output=True, text=True,
                       env=env, timeout=1200, cwd=root)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "| strategy" in p.stdout or "| setting" in p.stdout
