"""Shared fixtures: tiny random-weight models built in-process (no downloads), small data."""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch


ROOT = Path(__file__).resolve().parents[1]
# CI has the data beside the checkout; a git worktree under <project>/wt/<name> finds it two levels up.
SHARED_DATA = next((p for p in (ROOT.parent / "shared" / "data", ROOT.parent.parent / "shared" / "data") if p.is_dir()),
                   ROOT.parent / "shared" / "data")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PEFTKIT_CACHE", str(Path.home() / ".cache" / "peftkit"))


def minilm_dir() -> Path:
    from peftkit.assets import locate

    return locate("builtin:minilm").parent


def _tokenizer(kind: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_dir())
    if kind != "bert":
        # Decoders need eos/bos; the BERT word-piece vocabulary is fine for tiny tests.
        tok.eos_token, tok.bos_token = "[SEP]", "[CLS]"
    return tok


TINY = {
    "bert": lambda: __import__("transformers").BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=128),
    "llama": lambda: __import__("transformers").LlamaConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=128, pad_token_id=0, bos_token_id=101, eos_token_id=102,
        tie_word_embeddings=True),
    "gpt2": lambda: __import__("transformers").GPT2Config(
        vocab_size=30522, n_embd=32, n_layer=2, n_head=4, n_positions=128, pad_token_id=0,
        bos_token_id=101, eos_token_id=102),
    "phi3": lambda: __import__("transformers").Phi3Config(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=128, pad_token_id=0, bos_token_id=101, eos_token_id=102),
    "t5": lambda: __import__("transformers").T5Config(
        vocab_size=30522, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, pad_token_id=0,
        eos_token_id=102, decoder_start_token_id=0),
}


def build_tiny(kind: str, dest: Path, **config) -> Path:
    """A tiny random model of an architecture, saved as a from_pretrained directory;
    ``config`` overrides its config (e.g. hidden_size=64: bitsandbytes' CPU 4-bit kernel needs it)."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    torch.manual_seed(0)
    cfg = TINY[kind]()
    cfg.update(config)
    auto = {"bert": AutoModel, "t5": AutoModelForSeq2SeqLM}.get(kind, AutoModelForCausalLM)
    model = auto.from_config(cfg)
    model.save_pretrained(dest)
    _tokenizer(kind).save_pretrained(dest)
    return dest


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {k: build_tiny(k, root / k) for k in TINY}


POS = ["good", "great", "wonderful", "fine", "excellent", "moving", "brilliant", "fun"]
NEG = ["bad", "awful", "boring", "dull", "terrible", "weak", "poor", "tedious"]
FILL = ["the", "movie", "film", "was", "a", "plot", "really", "and", "story", "acting"]


def sentiment_rows(n: int, seed: int = 0) -> list[dict]:
    """Synthetic, learnable sentiment rows (label depends on the words)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        y = rng.random() < 0.5
        words = rng.sample(FILL, 4) + rng.sample(POS if y else NEG, 2)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": "pos" if y else "neg"})
    return rows


def write_csv(path: Path, rows: list[dict], delimiter: str = ",") -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
        w.writeheader()
        w.writerows(rows)
    return path


def dropout_free_setup(bert: Path, tmp: Path, n_train: int, n_test: int) -> tuple[Path, Path]:
    """(model, data) for multi-process tests: each rank draws its own dropout masks, so only a
    dropout-free model can match one process; 9 validation rows, ``n_test`` test rows."""
    model = shutil.copytree(bert, tmp / "bert")
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (model / "config.json").write_text(json.dumps(cfg))
    data = tmp / "data"
    data.mkdir()
    write_csv(data / "train.csv", sentiment_rows(n_train, 0))
    write_csv(data / "validation.csv", sentiment_rows(9, 1))
    write_csv(data / "test.csv", sentiment_rows(n_test, 2))
    return model, data


@pytest.fixture(scope="session")
def sentiment_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("sentiment")
    write_csv(d / "train.csv", sentiment_rows(96, 0))
    write_csv(d / "validation.csv", sentiment_rows(32, 1))
    write_csv(d / "test.csv", sentiment_rows(32, 2))
    return d


def tiny_recipe(model_dir: Path, data_dir: Path, strategy: str = "lora", **train) -> dict:
    """A recipe dict for a tiny model on the synthetic sentiment files (seconds to run)."""
    return {
        "name": "tiny",
        "model": {"name": str(model_dir)},
        "task": {"kind": "classification", "max_length": 32,
                 "data": {"dir": str(data_dir), "train": "train.csv", "validation": "validation.csv", "test": "test.csv"}},
        "strategy": {"name": strategy},
        "train": {"max_steps": 4, "batch_size": 8, "lr": 1e-3, "progress": False, "precision": "fp32", **train},
    }


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m peftkit ARGS`` in a fresh process, with this checkout first on the path."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "peftkit", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=env, timeout=timeout)


# -- shared builders (task recipes, fits, in-process search runs) --------------------------

def in_process(runs: list, pool=None, echo=None, record=None):
    """search._run_all, here: a trial batch through peftkit.runs.trial_batch.main, a run through cli.main."""
    from peftkit import cli
    from peftkit.io import atomic_write_text
    from peftkit.recipe import dump_yaml
    from peftkit.runs import trial_batch

    errs = []
    for r in runs:
        if isinstance(r, trial_batch.TrialBatch):
            if record is not None:
                record += [(t.variant, t.dir.relative_to(t.dir.parents[2]).as_posix(), t.recipe.train.stop_at)
                           for t in r.runs]
            r.dir.mkdir(parents=True, exist_ok=True)
            rc = trial_batch.main([r.command()[-1]])
            errs.append(None if rc == 0 and r.done() else {"message": f"exit {rc}"})
            continue
        r.dir.mkdir(parents=True, exist_ok=True)
        (r.dir / "result.json").unlink(missing_ok=True)
        f = r.dir.parent / f"seed{r.seed}.yaml"
        atomic_write_text(f, dump_yaml(r.recipe))
        if record is not None:
            record.append((r.variant, r.dir.relative_to(r.dir.parents[2]).as_posix(), r.recipe.train.stop_at))
        rc = cli.main(["train", str(f), "--out", str(r.dir), "--force"])
        errs.append(None if rc == 0 and r.done() else {"message": f"exit {rc}"})
    return errs


NER_PEOPLE = ["alice", "bob", "carol", "dave", "erin"]
NER_PLACES = ["paris", "london", "tokyo", "berlin"]
NER_FILL = ["i", "met", "in", "today", "with", "went", "to", "the", "and"]


def ner_rows(n, seed):
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        toks, tags = [], []
        for _ in range(rng.randint(3, 8)):
            r = rng.random()
            if r < 0.2:
                toks += [rng.choice(NER_PEOPLE).title(), "Zorblaxqui"]  # two words, the second split into sub-words
                tags += ["B-person", "I-person"]
            elif r < 0.35:
                toks.append(rng.choice(NER_PLACES).title())
                tags.append("B-location")
            else:
                toks.append(rng.choice(NER_FILL))
                tags.append("O")
        rows.append({"tokens": toks, "tags": tags})
    return rows


@pytest.fixture(scope="module")
def ner_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ner")
    for split, n, seed in (("train", 64, 0), ("validation", 16, 1), ("test", 16, 2)):
        (d / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ner_rows(n, seed)))
    return d


def ner_recipe(model_dir, data_dir, strategy="lora", files=("train.jsonl", "validation.jsonl", "test.jsonl"), **task):
    return {
        "model": {"name": str(model_dir)},
        "task": {"kind": "token_classification", "max_length": 32,
                 "data": {"dir": str(data_dir), **dict(zip(("train", "validation", "test"), files))}, **task},
        "strategy": {"name": strategy},
        "train": {"max_steps": 4, "batch_size": 16, "lr": 1e-3, "progress": False, "precision": "fp32"},
    }


@pytest.fixture(scope="module")
def instr_dir(tmp_path_factory):
    """JSONL rows: a review -> its label; the references are a list (the first one trains)."""
    d = tmp_path_factory.mktemp("instr")
    for split, n, seed in (("train", 96, 0), ("validation", 16, 1), ("test", 16, 2)):
        with open(d / f"{split}.jsonl", "w") as f:
            for r in sentiment_rows(n, seed):
                f.write(json.dumps({"review": r["text"].split(), "answer": [r["label"], f"it is {r['label']}"]}) + "\n")
    return d


def gen_recipe(model_dir, data_dir, kind="causal_lm", strategy="lora", metric="accuracy", task=None, **train):
    return {
        "model": {"name": str(model_dir)},
        "task": {"kind": kind, "prompt": "review: {review} sentiment:", "response_column": "answer",
                 "metric": metric, "max_length": 40, "max_target_length": 8, "max_new_tokens": 3,
                 "data": {"dir": str(data_dir), "train": "train.jsonl", "validation": "validation.jsonl",
                          "test": "test.jsonl"}, **(task or {})},
        "strategy": {"name": strategy},
        "train": {"max_steps": 30, "batch_size": 16, "lr": 3e-3, "progress": False, "precision": "fp32",
                  "log_every": 5, **train},
    }


def built(rec):
    from peftkit import recipe as R
    from peftkit.model.build import build

    return build(R.from_dict(rec))


def fit(rec, out):
    from peftkit.training.trainer import Trainer

    return Trainer(built(rec), out).fit()


def inject_nonfinite(monkeypatch, bad: dict[int, str]):
    """Make forward pass number n (one per step here) produce a NaN loss or NaN gradients."""
    import peftkit.model.build as B

    real = B.build

    def build(recipe, *a, **k):
        b = real(recipe, *a, **k)
        n = [0]

        def hook(module, args, out):
            if not module.training:
                return None
            n[0] += 1
            what = bad.get(n[0])
            if what == "loss":
                out["loss"] = out["loss"] * float("nan")
            elif what == "grad":
                out["loss"].register_hook(lambda g: g * float("inf"))
            return out

        b.model.register_forward_hook(hook)
        return b

    monkeypatch.setattr(B, "build", build)
