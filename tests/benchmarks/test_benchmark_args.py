"""Every benchmark script's command line parses (`--help`): a clash between two options added
by different changes (argparse raises at construction) must fail here, not on a user's run."""

import subprocess
import sys

import pytest

from conftest import ROOT

SCRIPTS = ["gpu_check", "mfu", "pooler_head", "profile_step", "speed_ablation", "sst2_accuracy", "vs_hf_trainer"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_help(name):
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--help"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "usage:" in p.stdout
