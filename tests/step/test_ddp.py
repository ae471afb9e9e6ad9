"""Multi-process training: 2 CPU processes (gloo DDP) give the 1-process result."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import yaml
from safetensors.torch import load_file

from conftest import ROOT, dropout_free_setup, sentiment_rows, tiny_recipe, write_csv
from peftkit.step import distributed as dist


def test_shards_cover_every_example_once():
    batches = [[5, 3, 9, 1, 7], [2, 0], [8, 4, 6], [10]]  # odd sizes, a last batch smaller than world
    world = 2
    seen = []
    for rank in range(world):
        shards, keep = dist.eval_shards(batches, rank, world)
        assert len(shards) == len(batches)  # same number of forwards on every rank
        assert all(shards)  # nobody runs an empty batch
        seen += [i for s, k in zip(shards, keep) if k for i in s]
    assert sorted(seen) == list(range(11))

    kept, local = dist.train_shards(batches, 1, world)
    assert kept == batches[:3] and local == [[3, 1], [0], [4]]
    assert dist.train_shards(batches, 0, 1) == (batches, batches)
    # Reweighting makes the average of per-rank means the global mean: 3/5 and 2/5 of 2x.
    assert dist.loss_weight(3, 5, 2) == pytest.approx(1.2) and dist.loss_weight(2, 5, 2) == pytest.approx(0.8)
    with pytest.raises(dist.UserError, match="train.batch_size"):
        dist.check_batch_size(1, 2)


def test_launch_commands():
    a = dist.launch_command(["train", "r.yaml"], "accelerate", 2)
    assert a[1:4] == ["-m", "accelerate.commands.launch", "--num_processes"]
    assert a[-4:] == ["-m", "peftkit", "train", "r.yaml"]
    assert "--multi_gpu" in a and "--cpu" not in a  # --cpu would start one process
    t = dist.launch_command(["train", "r.yaml"], "torchrun", 4)
    assert "--nproc_per_node=4" in t
    c = dist.launch_command(["train", "r.yaml"], "accelerate", 2, config_file="recipes/accelerate/fsdp.yaml")
    assert c[c.index("--config_file") + 1] == "recipes/accelerate/fsdp.yaml"


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": "1"}


@pytest.mark.slow  # 27 s; 2 processes == 1 is also covered by test_fsdp
def test_two_processes_match_one(tiny_models, tmp_path):
    model, data = dropout_free_setup(tiny_models["bert"], tmp_path, 60, 33)  # test: odd, shards of 17 and 16
    # batch_size 7 (global): shards of 4 and 3 every step, so the loss reweighting is exercised.
    # 60 examples = 9 batches; grad_accum 2: step 5 is a 1-batch group at the epoch's end, step 6
    # starts epoch 1.
    rec = tmp_path / "r.yaml"
    rec.write_text(yaml.safe_dump(tiny_recipe(model, data, "lora", max_steps=6, batch_size=7, grad_accum=2,
                                              log_every=1, warmup_ratio=0.0)))
    cmds = {1: [sys.executable, "-m", "peftkit", "train", str(rec), "--out", str(tmp_path / "run1")],
            2: [sys.executable, "-m", "peftkit", "train", str(rec), "--out", str(tmp_path / "run2"),
                "--launcher", "accelerate", "--nproc", "2"]}
    procs = {n: subprocess.Popen(c, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for n, c in cmds.items()}
    out = {n: p.communicate(timeout=300) for n, p in procs.items()}
    for n, p in procs.items():
        assert p.returncode == 0, out[n][1][-3000:]

    r1, r2 = (json.loads((tmp_path / f"run{n}" / "result.json").read_text()) for n in (1, 2))
    assert (r1["run"]["world_size"], r2["run"]["world_size"]) == (1, 2)
    # Every eval example exactly once, and the same predictions.
    assert r1["metrics"]["eval"]["examples"] == r2["metrics"]["eval"]["examples"] == 33
    for k in ("accuracy", "macro_f1"):
        assert r1["metrics"]["eval"][k] == r2["metrics"]["eval"][k]
    # fp32; the only difference is summation order (each rank's mean, then gloo's all-reduce
    # average, vs one mean over the batch): ~1e-7 relative per step, a few Adam steps of lr 1e-3.
    log1, log2 = ([json.loads(x) for x in (tmp_path / f"run{n}" / "log.jsonl").read_text().splitlines()]
                  for n in (1, 2))
    l1 = [x["loss"] for x in log1 if "loss" in x]
    l2 = [x["loss"] for x in log2 if "loss" in x]
    assert len(l1) == len(l2) == 6 and l1 == pytest.approx(l2, abs=1e-5)
    lr1 = [x["lr"] for x in log1 if "lr" in x]
    assert lr1 == [x["lr"] for x in log2 if "lr" in x]
    # Linear decay, one scheduler step per optimizer step: no step skipped or doubled at the epoch end.
    assert lr1 == pytest.approx([1e-3 * (6 - s) / 6 for s in range(1, 7)])
    w1, w2 = (load_file(tmp_path / f"run{n}" / "strategy.safetensors") for n in (1, 2))
    assert w1.keys() == w2.keys()
    for k in w1:
        assert (w1[k] - w2[k]).abs().max().item() < 1e-4, k
    # Throughput counts the global batch, not rank 0's share.
    # Same timed steps, same global examples and tokens (rank 0 alone would count about half).
    # (steps 1 and 2 are the FLOP counter's and the memory probe's: not timed)
    assert r1["speed"]["timed_steps"] == r2["speed"]["timed_steps"] == 4
    assert r1["speed"]["train_samples"] == r2["speed"]["train_samples"] >= 4 * 4
    assert r1["speed"]["train_tokens"] == r2["speed"]["train_tokens"] > r1["speed"]["train_samples"]
    assert r2["memory"]["measured"]["peak_of"] == "max over ranks" and len(r2["memory"]["measured"]["per_rank"]) == 2

    # Only rank 0 wrote files and printed.
    assert sorted(os.listdir(tmp_path / "run2")) == ["log.jsonl", "predictions.json", "recipe.yaml", "result.json", "strategy.safetensors"]
    stdout2 = out[2][0]
    assert stdout2.count("[peftkit] done:") == 1 and stdout2.count("trainable") == 1


def test_fewer_examples_than_processes_is_a_user_error(tiny_models, tmp_path):
    """Every global batch dropped (1 train example, 2 processes): one clear line, a rank exits 2 (it used to loop forever)."""
    data = tmp_path / "data"
    data.mkdir()
    write_csv(data / "train.csv", sentiment_rows(1, 0))
    write_csv(data / "validation.csv", sentiment_rows(4, 1))
    write_csv(data / "test.csv", sentiment_rows(4, 2))
    r = tiny_recipe(tiny_models["bert"], data, "lora", max_steps=1)
    r["task"]["labels"] = ["neg", "pos"]
    rec = tmp_path / "r.yaml"
    rec.write_text(yaml.safe_dump(r))
    cmd = [sys.executable, "-m", "peftkit", "train", str(rec), "--out", str(tmp_path / "run"),
           "--launcher", "accelerate", "--nproc", "2"]
    p = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        _, err = p.communicate(timeout=300)
    finally:
        if p.poll() is None:  # SIGTERM to peftkit and the launcher; torch elastic then stops its ranks
            os.killpg(p.pid, signal.SIGTERM)
            p.communicate(timeout=120)  # elastic escalates to SIGKILL after ~30 s
    msg = ("peftkit: error: task.data: the train split has 1 example(s): fewer than the 2 processes, "
           "so every global batch would be dropped; use fewer processes or more data")
    # From each rank that gets there first: torch elastic stops the other once one has exited.
    assert err.count(msg) >= 1 and not re.search(r"peftkit: error: (?!task\.data: the train split)", err), err[-3000:]
    # A rank exits 2; the launcher (torch elastic) reports that as its own exit 1.
    assert p.returncode == 1 and re.search(r"exitcode\s*:?\s*2\b", err), err[-3000:]
    assert not (tmp_path / "run" / "result.json").exists()
