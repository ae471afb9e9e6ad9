"""Adding a strategy or a task kind is one file and one registry line, nothing else.

On a copy of peftkit/ the test adds a toy strategy (norm tuning: only the layer norms and the
head train) and a toy task kind (a classification kind of its own), each as one new module plus
its import and registry line in the package's ``__init__.py``; every other file of the copy stays
as it is. A fresh process on that copy then runs every place a strategy or a kind is used: the
recipe validates, the search finds the strategy's default lr grid, the contract test's formula
matches the applied model, a tiny run trains, predicts (API and CLI) and exports a model card
that names the kind's pipeline tag and Auto class. Anything else a new strategy or kind needed
would fail here. (Executors: their own registry, ``peftkit/runs/executors/``.)
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, tiny_recipe

from peftkit import strategies, tasks

TOY_STRATEGY = '''\
"""Norm tuning: only the layer norms (weights and biases) and the task head train."""

from typing import Literal

from peftkit.strategies.adapter import norms
from peftkit.strategies.base import Strategy, StrategyConfig, freeze_all, unfreeze


class NormsConfig(StrategyConfig):
    name: Literal["norms"] = "norms"


class Norms(Strategy):
    name = "norms"
    Config = NormsConfig
    can_merge = True  # the trained norms are the model's own parameters
    needs_quantized = False
    default_lr = (1e-3, 3e-3, 1e-2)

    def apply(self, model, head):
        freeze_all(model)
        for m in norms(model):
            m.requires_grad_(True)
        unfreeze(model, head)
        return model

    def expected_trainable(self, facts):
        return sum(x.weight + x.bias for x in facts.norms) + facts.head
'''

TOY_KIND = '''\
"""A classification kind of its own: what predict, the CLI and the model card read is declared here."""

from typing import Literal

from peftkit.tasks.classification import Classification, ClassificationConfig


class ToyConfig(ClassificationConfig):
    kind: Literal["toy"] = "toy"  # type: ignore[assignment]


class Toy(Classification):
    kind = "toy"
    Config = ToyConfig
    auto_class_name = "AutoModelForSequenceClassification"
    pipeline_tag = "text-classification"
    model_classes = ()  # only directories peftkit wrote (classification claims the class names)
    echo_key = "sentence"
'''

# Runs in a fresh process on the extended copy; prints one JSON object of what it saw.
DRIVER = '''\
import contextlib, io, json, sys
from pathlib import Path

from peftkit import api, cli, strategies, tasks
from peftkit.model.build import build
from peftkit.recipe import from_dict
from peftkit.runs.search_space import Space, points
from peftkit.strategies import ModelFacts, count_params

rec, work = json.loads(sys.argv[1]), Path(sys.argv[2])
out = {"files": {"strategy": strategies.REGISTRY["norms"].__module__, "task": tasks.REGISTRY["toy"].__module__}}
recipe = from_dict(rec)  # the recipe schema takes the new strategy and kind
out["grid"] = [p["train.lr"] for p in points(Space(), "norms")]
b = build(recipe, apply_strategy=False)
facts = ModelFacts.of(b.model, b.head)
model = b.strategy.apply(b.model, b.head)
out["trainable"], out["expected"] = count_params(model)[0], b.strategy.expected_trainable(facts)
res = api.train(recipe, work / "run")
out["metrics"] = res["metrics"]["eval"]
out["predict"] = api.predict(work / "run", ["a great film"])
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    out["cli_rc"] = cli.main(["predict", str(work / "run"), "a great film", "--json"])
out["cli"] = json.loads(buf.getvalue())
s = api.export(work / "run", work / "export")
out["merged"] = s["merged"]
out["card"] = (work / "export" / "README.md").read_text(encoding="utf-8")
out["exported_predict"] = api.predict(work / "export", ["boring plot"])
print("RESULT " + json.dumps(out))
'''


def _add_line(init: Path, anchor: str, line: str) -> None:
    """Insert ``line`` after the first line of ``init`` that starts with ``anchor``."""
    lines = init.read_text(encoding="utf-8").splitlines(keepends=True)
    i = next(i for i, x in enumerate(lines) if x.startswith(anchor))
    lines.insert(i + 1, line + "\n")
    init.write_text("".join(lines), encoding="utf-8")


def extended_copy(dest: Path) -> Path:
    """peftkit/ copied to ``dest`` with the toy strategy and kind added: one file and one
    registry line (with its import) each."""
    pkg = shutil.copytree(ROOT / "peftkit", dest / "peftkit", ignore=shutil.ignore_patterns("__pycache__"))
    (pkg / "strategies" / "norms.py").write_text(TOY_STRATEGY, encoding="utf-8")
    _add_line(pkg / "strategies" / "__init__.py", "from peftkit.strategies.lora import", "from peftkit.strategies.norms import Norms")
    _add_line(pkg / "strategies" / "__init__.py", "REGISTRY:", '    "norms": Norms,')
    (pkg / "tasks" / "toy.py").write_text(TOY_KIND, encoding="utf-8")
    _add_line(pkg / "tasks" / "__init__.py", "from peftkit.tasks.seq2seq import", "from peftkit.tasks.toy import Toy")
    _add_line(pkg / "tasks" / "__init__.py", "REGISTRY:", '    "toy": Toy,')
    return pkg


def changed_files(a: Path, b: Path) -> list[str]:
    """Files that differ or exist on one side only (relative to ``b``), __pycache__ ignored."""
    cmp = filecmp.dircmp(a, b, ignore=["__pycache__"])
    out = [*cmp.left_only, *cmp.right_only, *(f for f in cmp.diff_files)]
    for sub in cmp.common_dirs:
        out += [f"{sub}/{f}" for f in changed_files(a / sub, b / sub)]
    return sorted(out)


def test_a_strategy_and_a_task_kind_are_one_file_and_one_registry_line_each(tiny_models, sentiment_dir, tmp_path):
    pkg = extended_copy(tmp_path / "src")
    assert changed_files(ROOT / "peftkit", pkg) == ["strategies/__init__.py", "strategies/norms.py",
                                                    "tasks/__init__.py", "tasks/toy.py"]
    rec = tiny_recipe(tiny_models["bert"], sentiment_dir, "norms")
    rec["task"]["kind"] = "toy"
    env = {**os.environ, "PYTHONPATH": str(pkg.parent)}
    p = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(rec), str(tmp_path)], capture_output=True,
                       text=True, env=env, cwd=tmp_path, timeout=600)
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert p.returncode == 0 and line, p.stderr[-3000:]
    r = json.loads(line.removeprefix("RESULT "))
    assert r["files"] == {"strategy": "peftkit.strategies.norms", "task": "peftkit.tasks.toy"}  # the copy ran
    assert r["grid"] == [1e-3, 3e-3, 1e-2]  # the search's default grid is the strategy's own
    # The contract formula; BERT-tiny: 2 blocks x 2 norms + the embedding norm, 2 x 32 each; the head.
    assert r["trainable"] == r["expected"] == 5 * 64 + (2 * 32 + 2) + (32 * 32 + 32)
    assert 0.0 <= r["metrics"]["accuracy"] <= 1.0
    assert set(r["predict"][0]) == {"label", "score"} and r["predict"][0]["label"] in ("pos", "neg")
    assert r["cli_rc"] == 0 and r["cli"][0]["sentence"] == "a great film"  # the kind's echo_key
    assert r["merged"] and set(r["exported_predict"][0]) == {"label", "score"}
    card = r["card"]
    assert "pipeline_tag: text-classification" in card and "AutoModelForSequenceClassification.from_pretrained" in card
    assert "- toy" in card and "- norms" in card  # tags: the kind and the strategy


@pytest.mark.parametrize("missing", ["pipeline_tag", "auto_class_name", "model_classes", "echo_key"])
def test_a_task_kind_without_its_declarations_is_refused_at_registration(missing):
    attrs = {"kind": "toy", "Config": tasks.REGISTRY["classification"].Config, "auto_class_name": "AutoModel",
             "pipeline_tag": "text-classification", "model_classes": (), "echo_key": "text"}
    del attrs[missing]
    # Built on the bare Task base, which declares none of them (an inheriting kind inherits them).
    cls = type("Toy", (tasks.Task,), attrs)
    with pytest.raises(TypeError, match=f"must declare: .*{missing}"):
        tasks.check_class("toy", cls)


def test_a_strategy_without_a_grid_or_a_formula_is_refused_at_registration():
    class Bare(strategies.Strategy):
        name = "bare"
        Config = strategies.REGISTRY["full"].Config

        def apply(self, model, head):
            return model

    with pytest.raises(TypeError, match=r"default_lr .*expected_trainable"):
        strategies.check_class("bare", Bare)
    Bare.default_lr = (1e-3,)
    Bare.expected_trainable = lambda self, facts: facts.total
    strategies.check_class("bare", Bare)  # complete now
    for key, cls in {**strategies.REGISTRY, **tasks.REGISTRY}.items():  # the shipped ones are complete
        (strategies if key in strategies.REGISTRY else tasks).check_class(key, cls)


def test_predict_tells_a_foreign_directory_s_kind_from_the_kinds_declarations():
    from types import SimpleNamespace

    from peftkit.export.predict import kind_by_class

    by_class = kind_by_class()
    assert {s: k for k, cls in tasks.REGISTRY.items() for s in cls.model_classes} == by_class
    assert by_class["LMHeadModel"] == "causal_lm" and by_class["ForTokenClassification"] == "token_classification"
    # A vision-language decoder is named ...ForConditionalGeneration too: seq2seq claims encoder-decoders only.
    seq2seq = tasks.REGISTRY[by_class["ForConditionalGeneration"]]
    assert seq2seq.claims(SimpleNamespace(is_encoder_decoder=True)) and not seq2seq.claims(SimpleNamespace())
