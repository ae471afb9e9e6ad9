"""FSDP for real on CPU: 2 gloo processes, sharded by torch's fully_shard, give the 1-process run."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from safetensors.torch import load_file

from conftest import ROOT, dropout_free_setup, tiny_recipe
from peftkit.step import distributed as dist
from peftkit.errors import UserError

FSDP2 = str(ROOT / "recipes" / "accelerate" / "fsdp.yaml")


def _acc(kind: str):
    return SimpleNamespace(distributed_type=SimpleNamespace(value=kind))


def test_cpu_fsdp_detection_and_refusals(monkeypatch):
    monkeypatch.setattr(dist.torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert dist.cpu_fsdp(_acc("MULTI_CPU")) and dist.distributed_type(_acc("MULTI_CPU")) == "FSDP"
    assert "fully_shard" in dist.requested_but_not_used(_acc("MULTI_CPU"))
    assert dist.sharded(_acc("MULTI_CPU"))
    monkeypatch.setenv("FSDP_VERSION", "1")  # FSDP1 is not run as DDP in disguise: refused
    with pytest.raises(UserError, match="FSDP was requested but accelerate would run MULTI_CPU.*FSDP2"):
        dist.requested_but_not_used(_acc("MULTI_CPU"))
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(UserError, match="DEEPSPEED was requested"):
        dist.requested_but_not_used(_acc("MULTI_CPU"))
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    assert dist.requested_but_not_used(_acc("NO")) is None and not dist.sharded(_acc("MULTI_CPU"))


def _losses(run):
    return [r["loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "loss" in r]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_fsdp2_two_processes_match_one(tiny_models, tmp_path):
    model, data = dropout_free_setup(tiny_models["bert"], tmp_path, 40, 17)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    procs = {}
    for strategy in ("full", "lora"):
        rec = tmp_path / f"{strategy}.yaml"
        # Global batch 7: shards of 4 and 3 (uneven, reweighted); grad_accum 2.
        rec.write_text(yaml.safe_dump(tiny_recipe(model, data, strategy, max_steps=4, batch_size=7, grad_accum=2,
                                                  log_every=1, warmup_ratio=0.0)))
        base = [sys.executable, "-m", "peftkit", "train", str(rec), "--out"]
        # Two 2-process groups run at once: each its own rendezvous port (the config's default is 29500).
        cfg = yaml.safe_load(Path(FSDP2).read_text()) | {"main_process_port": _free_port()}
        (tmp_path / f"fsdp-{strategy}.yaml").write_text(yaml.safe_dump(cfg))
        fsdp = str(tmp_path / f"fsdp-{strategy}.yaml")
        for n, extra in ((1, []), (2, ["--launcher", "accelerate", "--nproc", "2", "--accelerate-config", fsdp])):
            procs[strategy, n] = subprocess.Popen(base + [str(tmp_path / f"{strategy}{n}"), *extra], env=env,
                                                  cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                  text=True)
    logs = {k: p.communicate(timeout=600)[0] for k, p in procs.items()}
    for k, p in procs.items():
        assert p.returncode == 0, (k, logs[k][-3000:])
    for strategy in ("full", "lora"):
        one, two = tmp_path / f"{strategy}1", tmp_path / f"{strategy}2"
        r1, r2 = (json.loads((d / "result.json").read_text()) for d in (one, two))
        assert (r2["run"]["world_size"], r2["run"]["distributed_type"]) == (2, "FSDP")
        assert "fully_shard" in logs[strategy, 2]
        # Really sharded (not DDP): each rank holds half of the weights.
        w1 = r1["memory"]["measured"]["live"]["at_peak"]["weights"]
        w2 = r2["memory"]["measured"]["live"]["at_peak"]["weights"]
        assert w2 < 0.55 * w1, (w1, w2)
        # fp32; only the summation order differs (per-rank means, then gloo's reduce-scatter average,
        # vs one mean over the batch): ~1e-7 relative per step over 4 Adam steps (measured: <1e-7).
        l1, l2 = _losses(one), _losses(two)
        assert len(l1) == len(l2) == 4 and l1 == pytest.approx(l2, abs=1e-5)
        assert r1["metrics"]["eval"]["examples"] == r2["metrics"]["eval"]["examples"] == 17
        assert r1["metrics"]["eval"]["accuracy"] == r2["metrics"]["eval"]["accuracy"]
        # The saved weights are full tensors: same keys and shapes as the 1-process run, same values.
        s1, s2 = load_file(one / "strategy.safetensors"), load_file(two / "strategy.safetensors")
        assert s1.keys() == s2.keys() and all(s1[k].shape == s2[k].shape for k in s1)
        assert max((s1[k] - s2[k]).abs().max().item() for k in s1) < 1e-4
