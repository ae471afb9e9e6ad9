"""Export merged weights, prove they are the same model, predict from them."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import _tokenizer, tiny_recipe
from peftkit import cli, strategies
from peftkit.export import merge as E
from peftkit.export.predict import Predictor

MERGEABLE = sorted(n for n, s in strategies.REGISTRY.items() if s.can_merge)
NOT_MERGEABLE = sorted(n for n, s in strategies.REGISTRY.items() if not s.can_merge)
TEXTS = ["a great and wonderful film", "boring, dull and awful", "the plot was fine", "terrible acting"]


@pytest.fixture(scope="module")
def bert64(tmp_path_factory):
    """Tiny BERT with hidden size 64: bitsandbytes' CPU 4-bit kernel needs in_features >= its block size (64)."""
    from transformers import AutoModel, BertConfig

    d = tmp_path_factory.mktemp("bert64")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=128,
                     initializer_range=0.1)  # 0.02 gives near-constant outputs: too insensitive a check
    AutoModel.from_config(cfg).save_pretrained(d)
    _tokenizer("bert").save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def runs(bert64, sentiment_dir, tmp_path_factory):
    """Trained tiny runs, one per strategy, made on first use."""
    from peftkit import recipe as R
    from peftkit.model.build import build
    from peftkit.training.trainer import Trainer

    root, made = tmp_path_factory.mktemp("runs"), {}

    def get(strategy):
        if strategy not in made:
            # lr 1e-2: the strategy's weights move far enough that dropping them would show.
            rec = R.from_dict(tiny_recipe(bert64, sentiment_dir, strategy, lr=1e-2))
            Trainer(build(rec), root / strategy).fit()
            made[strategy] = root / strategy
        return made[strategy]

    return get


@pytest.mark.parametrize("strategy", MERGEABLE)
def test_export_verify_every_mergeable_strategy(strategy, runs, tmp_path):
    run, out = runs(strategy), tmp_path / "merged"
    s = E.export(run, out, verify=True, verify_examples=24)
    v = json.loads((out / "verify.json").read_text())
    assert v == s["verify"] and v["passed"], v
    assert v["examples"] == 24 and v["argmax_agreement"] == 1.0
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert cfg["id2label"] == {"0": "neg", "1": "pos"} and cfg["architectures"] == ["BertForSequenceClassification"]
    assert {"model.safetensors", "tokenizer.json", "peftkit.json"} <= set(s["files"])
    assert not list(out.parent.glob(".merged.*"))  # no temp dirs left behind
    if strategies.REGISTRY[strategy].needs_quantized:
        # Merged into the dequantized 4-bit weights; bitsandbytes computes 4-bit layers in
        # bf16 on this CPU, so the bf16 tolerance applies. Merging into the original weights
        # (the alternative) is measurably further from the model as trained.
        assert v["merge_base"]["used"] == "dequantized-4bit" and v["tolerance"]["precision"] == "bf16"
        alt = v["merge_base"]["alternative"]
        assert v["max_abs_logit_diff"] < alt["max_abs_logit_diff"]
        assert v["mean_abs_logit_diff"] < alt["mean_abs_logit_diff"]
    else:
        assert v["tolerance"]["precision"] == "fp32" and v["max_abs_logit_diff"] <= 1e-4


def test_verify_catches_a_different_model(runs, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    run, out = runs("lora"), tmp_path / "merged"
    E.export(run, out)
    sd = load_file(out / "model.safetensors")
    key = next(k for k in sd if k.endswith("attention.self.query.weight"))
    sd[key] = sd[key] + 1e-2 * torch.randn_like(sd[key])
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    from peftkit.io import IntegrityError, sha256_file

    with pytest.raises(IntegrityError, match="model.safetensors: sha256"):
        E.verify(run, out, verify_examples=16)
    meta = json.loads((out / "peftkit.json").read_text())  # a consistent export of a different model
    meta["sha256"]["model.safetensors"] = sha256_file(out / "model.safetensors")
    (out / "peftkit.json").write_text(json.dumps(meta))
    v = E.verify(run, out, verify_examples=16)
    assert not v["passed"] and v["max_abs_logit_diff"] > 1e-4
    # ... and the CLI exits 1 when a fresh export is over tolerance.
    monkeypatch.setattr(E, "ATOL", -1.0)
    assert cli.main(["export", str(run), "--out", str(tmp_path / "again"), "--verify", "--verify-examples", "8"]) == 1
    assert json.loads((tmp_path / "again" / "verify.json").read_text())["passed"] is False


BLOCKER = """
import sys
BLOCKED = {"peft", "peftkit"}

class Hide:
    # Wraps every import finder: blocked packages look not installed (find_spec -> None).
    def __init__(self, inner):
        self.inner = inner
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            return None
        f = getattr(self.inner, "find_spec", None)
        return f(name, path, target) if f else None
    def __getattr__(self, attr):
        return getattr(self.inner, attr)

sys.meta_path[:] = [Hide(f) for f in sys.meta_path]
"""

PLAIN = """
import json, sys
for name in ("peft", "peftkit"):
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        raise SystemExit(f"{name} is importable: the blocker does not work")
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
d, texts = sys.argv[1], json.loads(sys.argv[2])
model = AutoModelForSequenceClassification.from_pretrained(d).eval()
tok = AutoTokenizer.from_pretrained(d)
with torch.no_grad():
    probs = model(**tok(texts, padding=True, truncation=True, return_tensors="pt")).logits.softmax(-1)
assert not any(m.split(".")[0] in ("peft", "peftkit") for m in sys.modules), "peft got imported"
print(json.dumps([{"label": model.config.id2label[int(i)], "score": float(p[i])} for p, i in zip(probs, probs.argmax(-1))]))
"""


def test_plain_transformers_without_peft_reproduces_predictions(runs, tmp_path):
    run, out = runs("lora"), tmp_path / "merged"
    E.export(run, out)
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text(BLOCKER)
    (tmp_path / "plain.py").write_text(PLAIN)
    env = {**os.environ, "PYTHONPATH": str(block)}
    p = subprocess.run([sys.executable, str(tmp_path / "plain.py"), str(out), json.dumps(TEXTS)],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    plain = json.loads(p.stdout.strip().splitlines()[-1])
    # The same texts through peftkit: the exported dir, and the run dir (peft model, unmerged).
    for source in (out, run):
        ours = Predictor.load(source).predict(TEXTS)
        assert [x["label"] for x in ours] == [x["label"] for x in plain]
        assert max(abs(a["score"] - b["score"]) for a, b in zip(ours, plain)) < 1e-5
    # The child checked that `import peft` fails there; without the blocker the same
    # interpreter finds peft and peftkit.
    find = "import importlib.util as u; print(u.find_spec('peft') is not None, u.find_spec('peftkit') is not None)"
    found = subprocess.run([sys.executable, "-c", find], capture_output=True, text=True, cwd=tmp_path).stdout
    assert found.split() == ["True", "True"]


def test_bf16_export(runs, tmp_path):
    out = tmp_path / "bf16"
    v = E.export(runs("lora"), out, dtype="bf16", verify=True, verify_examples=24)["verify"]
    assert v["passed"] and v["tolerance"]["precision"] == "bf16"
    assert 0 < v["max_abs_logit_diff"] <= 0.05 * v["max_abs_logit"]
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize("strategy", ["lora", "full"])
def test_adapter_only(strategy, runs, tmp_path, capsys):
    run, out = runs(strategy), tmp_path / "adapter"
    capsys.readouterr()  # training output
    assert cli.main(["export", str(run), "--out", str(out), "--adapter-only", "--verify", "--verify-examples", "8"]) == 0
    printed = capsys.readouterr().out
    assert "adapter only" in printed and " MB" in printed and "verify ok" in printed
    files = {f.name for f in out.iterdir()}
    assert {"recipe.yaml", "tokenizer.json", "verify.json"} <= files
    if strategy == "lora":
        assert {"adapter_config.json", "adapter_model.safetensors"} <= files  # peft's format
        assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    else:
        assert "strategy.safetensors" in files
    assert json.loads((out / "verify.json").read_text())["max_abs_logit_diff"] == 0.0
    assert Predictor.load(out).predict(TEXTS) == Predictor.load(run).predict(TEXTS)


@pytest.mark.parametrize("strategy", NOT_MERGEABLE + ["stand-in"])
def test_not_mergeable(strategy, runs, tmp_path, capsys, monkeypatch):
    if strategy == "stand-in":
        # A peft strategy that declares itself not mergeable, until real ones are registered.
        class NoMerge(strategies.REGISTRY["lora"]):
            can_merge = False

        monkeypatch.setitem(strategies.REGISTRY, "lora", NoMerge)
        strategy = "lora"
    run, out = runs(strategy), tmp_path / "out"
    capsys.readouterr()  # training output
    assert cli.main(["export", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot be folded" in err and "--adapter-only" in err
    assert not out.exists()
    assert cli.main(["export", str(run), "--out", str(out), "--adapter-only"]) == 0
    assert Predictor.load(out).predict(TEXTS) == Predictor.load(run).predict(TEXTS)


def test_out_dir_rules(runs, tmp_path, capsys):
    run, out = runs("full"), tmp_path / "out"
    capsys.readouterr()  # training output
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert cli.main(["export", str(run), "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err and (out / "keep.txt").exists()
    assert cli.main(["export", str(run), "--out", str(run), "--force"]) == 2
    assert "run directory" in capsys.readouterr().err and (run / "strategy.safetensors").exists()
    assert cli.main(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "o2")]) == 2
    assert cli.main(["export", str(run), "--out", str(out), "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    capsys.readouterr()
    assert cli.main(["predict", str(out), *TEXTS[:2], "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [g["text"] for g in got] == TEXTS[:2] and all(g["label"] in ("neg", "pos") for g in got)
    assert all(0.5 <= g["score"] <= 1.0 for g in got)


def test_atomic_dir_keeps_old_on_failure(tmp_path):
    from peftkit.io import atomic_dir

    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "new").write_text("half")
        raise RuntimeError("boom")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "old").exists()
    with atomic_dir(out) as tmp:
        (tmp / "new").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new"] and len(list(tmp_path.iterdir())) == 1


# -- runs that cannot be exported: one line, exit 2 ------------------------------------------
def _export_error(capsys, run, out):
    capsys.readouterr()
    rc = cli.main(["export", str(run), "--out", str(out)])
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert lines and lines[-1].startswith("peftkit: error: ") and "Traceback" not in err, err
    assert not out.exists()
    return rc, lines[-1]


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_export_of_corrupt_weights_is_one_line_naming_the_file(runs, tmp_path, capsys, damage):
    run = shutil.copytree(runs("lora"), tmp_path / "run")
    w = run / "strategy.safetensors"
    data = w.read_bytes()
    w.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"not a safetensors file" * 8, "empty": b""}[damage])
    rc, line = _export_error(capsys, run, tmp_path / "out")
    # The sha256 result.json recorded catches it before safetensors parses the file.
    assert rc == 2 and str(w) in line and "differs from the" in line and "result.json" in line, line
    res = json.loads((run / "result.json").read_text())
    del res["artifact"]["strategy_sha256"]  # a run from before hashes were recorded: the parser catches it
    (run / "result.json").write_text(json.dumps(res))
    rc, line = _export_error(capsys, run, tmp_path / "out")
    assert rc == 2 and str(w) in line and "corrupt or truncated" in line, line


def test_export_of_an_interrupted_run_says_where_it_stopped_and_how_to_resume(runs, tmp_path, capsys):
    from peftkit.training import checkpoint
    from peftkit import recipe as R

    run = shutil.copytree(runs("lora"), tmp_path / "run")
    (run / "result.json").unlink()
    (run / "strategy.safetensors").unlink()  # what a kill at step 3 leaves: recipe, log, checkpoints
    h = R.load(run / "recipe.yaml").hash()
    for step in (2, 3):
        checkpoint.write(run / "checkpoints", step, h, {"w": torch.ones(2)}, {"step": step}, keep=2)
    rc, line = _export_error(capsys, run, tmp_path / "out")
    assert rc == 2 and "stopped at step 3" in line and "save_weights" not in line, line
    cmd = line.split("e.g. ")[1].split()
    assert cmd[:2] == ["peftkit", "train"] and cmd[3:] == ["--out", str(run)], line
    from peftkit.training.rundir import check_run_dir

    # The command it names resumes that run rather than starting over.
    assert check_run_dir(run, R.load(cmd[2]).hash(), force=False) == "resume"


def test_export_of_a_finished_run_without_weights(runs, tmp_path, capsys):
    run = shutil.copytree(runs("lora"), tmp_path / "run")
    (run / "strategy.safetensors").unlink()
    rc, line = _export_error(capsys, run, tmp_path / "out")
    assert rc == 2 and "strategy.safetensors is missing" in line, line
    rec = (run / "recipe.yaml").read_text().replace("save_weights: true", "save_weights: false")
    (run / "recipe.yaml").write_text(rec)
    rc, line = _export_error(capsys, run, tmp_path / "out")
    assert rc == 2 and "trained with output.save_weights: false" in line, line


# -- integrity: recorded sha256 checked everywhere (issue #28) --------------------------------
def _flip(path, n=1000):
    """Flip ``n`` bytes inside the tensor data: same size, the header intact, still parseable."""
    import struct

    data = bytearray(path.read_bytes())
    start = 8 + struct.unpack("<Q", data[:8])[0]
    for i in range(start + 16, start + 16 + n):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    from safetensors.torch import load_file

    load_file(path)  # still a valid safetensors file


def _one_line(capsys, *argv):
    capsys.readouterr()
    rc = cli.main(list(argv))
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("peftkit: error: "), err
    return rc, lines[0]


def test_flipped_bytes_in_run_weights_refused_everywhere(runs, tmp_path, capsys):
    run = shutil.copytree(runs("lora"), tmp_path / "cmp" / "lora" / "seed0")
    res = json.loads((run / "result.json").read_text())
    w = run / "strategy.safetensors"
    assert res["artifact"]["strategy_sha256"] == __import__("hashlib").sha256(w.read_bytes()).hexdigest()
    _flip(w)
    for argv in (["export", str(run), "--out", str(tmp_path / "out"), "--verify"],
                 ["predict", str(run), "a fine film"],
                 ["report", str(tmp_path / "cmp")]):
        rc, line = _one_line(capsys, *argv)
        assert rc == 2 and line.startswith(f"peftkit: error: {w}: sha256 ") and "result.json" in line, (argv, line)
    assert not (tmp_path / "out").exists() and not (tmp_path / "cmp" / "report.json").exists()


def test_export_records_and_predict_checks_its_weights(runs, tmp_path, capsys):
    run, out = runs("lora"), tmp_path / "merged"
    E.export(run, out)
    meta = json.loads((out / "peftkit.json").read_text())
    assert set(meta["sha256"]) == {"model.safetensors"}
    Predictor.load(out)  # intact: loads
    _flip(out / "model.safetensors")
    rc, line = _one_line(capsys, "predict", str(out), "a fine film")
    assert rc == 2 and f"{out / 'model.safetensors'}: sha256 " in line and "peftkit.json" in line, line


def test_adapter_only_export_records_its_weights(runs, tmp_path, capsys):
    run, out = runs("ia3"), tmp_path / "adapter"
    E.export(run, out, adapter_only=True)
    (name,) = json.loads((out / "peftkit.json").read_text())["sha256"]
    _flip(out / name)
    rc, line = _one_line(capsys, "predict", str(out), "a fine film")
    assert rc == 2 and f"{out / name}: sha256 " in line, line


def test_verify_compares_the_metric_the_run_recorded(runs, tmp_path, capsys):
    run = shutil.copytree(runs("lora"), tmp_path / "run")
    s = E.export(run, tmp_path / "ok", verify=True, verify_examples=8)
    mc = s["verify"]["metric_check"]
    assert mc["passed"] and mc["metric"] == "accuracy" and mc["examples"] == 32
    assert mc["exported"] == pytest.approx(mc["recorded"], abs=mc["tolerance"]) and mc["tolerance"] == 1 / 32
    res = json.loads((run / "result.json").read_text())
    res["metrics"]["eval"]["accuracy"] = 1.0 - res["metrics"]["eval"]["accuracy"] + 0.01  # not what it scores
    (run / "result.json").write_text(json.dumps(res))
    capsys.readouterr()
    rc = cli.main(["export", str(run), "--out", str(tmp_path / "bad"), "--verify", "--verify-examples", "8"])
    out = capsys.readouterr().out
    assert rc == 1 and "verify FAILED: accuracy of the export" in out, out
    assert json.loads((tmp_path / "bad" / "verify.json").read_text())["passed"] is False


def test_one_recipe_hash_everywhere(runs, tmp_path):
    run, out = runs("lora"), tmp_path / "merged"
    E.export(run, out)
    h = json.loads((run / "result.json").read_text())["run"]["recipe_hash"]
    assert json.loads((out / "peftkit.json").read_text())["recipe_hash"] == h
    card = (out / "README.md").read_text()
    assert f"`{h}`" in card and card.count("recipe_hash") >= 1
    import re

    assert set(re.findall(r"\b(?=[0-9]*[a-f])[0-9a-f]{16}\b", card)) == {h}  # no other hash shown


def test_artifacts_follow_the_umask(runs, tmp_path):
    import stat

    old = os.umask(0o022)
    try:
        run = runs("lora")
        E.export(run, tmp_path / "merged")
    finally:
        os.umask(old)
    files = [run / "result.json", run / "strategy.safetensors", *(tmp_path / "merged").iterdir()]
    assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in files} == {f.name: 0o644 for f in files}
