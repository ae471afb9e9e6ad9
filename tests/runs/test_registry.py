"""The executor registry, the job contract, and the compare recipe read once.

A new executor is one module and one registry line: the test below writes the module, adds the
line, and runs a comparison through it from the command line; nothing else may be needed.
"""

from __future__ import annotations

import importlib
import json
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest
import yaml

from conftest import tiny_recipe
from peftkit import api, cli
from peftkit import recipe as R
from peftkit.errors import RecipeError, UserError
from peftkit.runs import compare as C
from peftkit.runs import executors as X
from peftkit.runs import search
from peftkit.runs.spec import Job, RunSpec
from peftkit.runs.trials import TrialBatch

TOY = '''
"""toy: one job at a time, in order, each where its tag says."""
from typing import Any, ClassVar, Literal

from peftkit.runs.executors.base import Executor, ExecutorConfig, execute, finish, label, pending, train_args


class ToyConfig(ExecutorConfig):
    name: Literal["toy"] = "toy"
    tag: str = "toy"
    FLAGS: ClassVar[dict[str, dict[str, Any]]] = {"tag": {"help": "where the toy says it ran"}}


class ToyExecutor(Executor):
    """one job at a time"""
    name = "toy"
    Config = ToyConfig

    def run(self, jobs, echo=print):
        outs, todo = pending(jobs, echo)
        for i in todo:
            rep = execute(jobs[i], self.cfg.timeout_s, {}, train_args(self.cfg))
            outs[i] = finish(label(i + 1, len(jobs), jobs[i]), jobs[i], rep, f"{self.cfg.tag}:{rep['host']}", echo)
        return outs
'''


def _compare_file(tmp_path, tiny_models, sentiment_dir, variants, **extra) -> Path:
    base = tiny_recipe(tiny_models["bert"], sentiment_dir, "bitfit", max_steps=2)
    base["output"] = {"report_to": []}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    f = tmp_path / "compare.yaml"
    f.write_text(yaml.safe_dump({"base": "base.yaml", "variants": variants, **extra}))
    return f


def test_a_new_executor_is_one_module_and_one_registry_line(tiny_models, sentiment_dir, tmp_path, monkeypatch,
                                                             capsys):
    (tmp_path / "toy_executor.py").write_text(textwrap.dedent(TOY))  # the one file
    monkeypatch.syspath_prepend(str(tmp_path))
    toy = importlib.import_module("toy_executor")
    monkeypatch.setitem(X.REGISTRY, "toy", toy.ToyExecutor)  # the one line
    f = _compare_file(tmp_path, tiny_models, sentiment_dir, [{"name": "bitfit"}],
                      executor={"name": "toy", "tag": "recipe"})
    out = tmp_path / "out"
    # The CLI's --executor choices and flags (--tag) come from the registry; the flag beats the recipe.
    assert cli.main(["compare", str(f), "--out", str(out), "--executor", "toy", "--tag", "flag"]) == 0
    res = json.loads((out / "bitfit" / "seed0" / "result.json").read_text())
    assert res["speed"]["steps"] == 2
    meta = json.loads((out / "compare.json").read_text())
    assert meta["executor"] == {"name": "toy", "tag": "flag", "parallel": 1}
    ran = meta["runs"][0]["execution"]
    assert ran["where"].startswith("flag:") and ran["executor"] == "toy"
    assert "[1/1] bitfit seed 0  done" in capsys.readouterr().out
    # Its typed config checks the recipe's section: one line naming the key, nothing run.
    bad = _compare_file(tmp_path, tiny_models, sentiment_dir, [{"name": "bitfit"}], executor={"name": "toy", "tagg": 1})
    assert cli.main(["compare", str(bad), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "executor.tagg: unknown option of executor 'toy'" in err
    assert not (tmp_path / "o2").exists()


def test_unknown_executor_is_one_line(tmp_path, tiny_models, sentiment_dir, capsys):
    f = _compare_file(tmp_path, tiny_models, sentiment_dir, [{"name": "a"}], executor={"name": "kubernetes"})
    assert cli.main(["compare", str(f), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "executor.name: unknown executor 'kubernetes' (known: local, slurm, ray)" in err and str(f) in err
    with pytest.raises(SystemExit):  # the CLI refuses what the registry does not hold
        cli.parse_args(["compare", str(f), "--out", "o", "--executor", "kubernetes"])


def test_flags_over_the_recipe_section(tmp_path, tiny_models, sentiment_dir):
    f = _compare_file(tmp_path, tiny_models, sentiment_dir, [{"name": "a"}],
                      executor={"name": "slurm", "partition": "gpu", "parallel": 3, "time_min": 30})
    p = C.prepare(f, tmp_path / "o")
    assert isinstance(p.executor, X.SlurmConfig) and (p.executor.partition, p.executor.time_min) == ("gpu", 30)
    p = C.prepare(f, tmp_path / "o", executor={"name": "local", "parallel": None, "partition": None}, timeout=5)
    # Another executor on the command line: the recipe's options it has (parallel) still apply.
    assert isinstance(p.executor, X.LocalConfig) and p.executor.parallel == 3 and p.executor.timeout_s == 5
    with pytest.raises(UserError, match="executor.partition: unknown option of executor 'local'"):
        C.prepare(f, tmp_path / "o", executor={"name": "local", "partition": "cpu"})


def test_compare_recipe_is_read_once(tmp_path, tiny_models, sentiment_dir, monkeypatch):
    f = _compare_file(tmp_path, tiny_models, sentiment_dir,
                      [{"name": "a", "set": {"train.lr": 1e-3}}, {"name": "b", "set": {"train.lr": 2e-3}}],
                      seeds=[0, 1])
    reads = Counter()
    real = R.read_yaml

    def counted(path):
        reads[Path(path).name] += 1
        return real(path)

    monkeypatch.setattr(R, "read_yaml", counted)
    plans = []

    def fake_run(plan, echo=print, progress=None):  # what api hands down: the plan, not the path
        plans.append(plan)
        if plan.search is not None:
            search.trial_plan(plan)
        plan.out.mkdir(parents=True, exist_ok=True)
        (plan.out / "report.json").write_text(json.dumps({"failed": []}))
        return 0

    monkeypatch.setattr(C, "run", fake_run)
    monkeypatch.setattr(search, "run", fake_run)
    assert api.compare(f, tmp_path / "o", progress=False, echo=lambda *_: None) == {"failed": []}
    assert reads == {"compare.yaml": 1, "base.yaml": 1} and len(plans[0].runs) == 4
    spec = yaml.safe_load(f.read_text()) | {"search": {"lr": [1e-3, 3e-3]}}
    f.write_text(yaml.safe_dump(spec))
    reads.clear()
    api.compare(f, tmp_path / "o", progress=False, echo=lambda *_: None)
    assert reads == {"compare.yaml": 1, "base.yaml": 1} and plans[1].search is not None


class Script(Job):
    """A job that is neither a run nor a trial batch: executors need only the Job interface."""

    def __init__(self, d: Path, code: str):
        self.dir, self.code = d, code

    @property
    def title(self) -> str:
        return f"script {self.dir.name}"

    def done(self) -> bool:
        return (self.dir / "result.json").exists()

    def command(self, args=()) -> list[str]:
        return [sys.executable, "-c", self.code]

    def identity(self) -> dict:
        return {"script": self.dir.name}


def test_executor_runs_any_job_by_its_contract(tmp_path):
    ok = Script(tmp_path / "ok", f"open({str(tmp_path / 'ok' / 'result.json')!r}, 'w').write('{{}}')")
    bad = Script(tmp_path / "bad", "import sys; print('first'); print('the reason'); sys.exit(3)")
    lines: list[str] = []
    outs = X.from_options("local", parallel=2, cpus_per_run=1).run([ok, bad], echo=lines.append)
    assert [o.status for o in outs] == ["done", "failed"] and "[1/2] script ok: done" in "\n".join(lines)
    err = json.loads((tmp_path / "bad" / "error.json").read_text())
    assert err["script"] == "bad" and err["returncode"] == 3 and err["message"] == "the reason"
    assert [o.status for o in X.from_options("local").run([ok], echo=lines.append)] == ["skipped"]


def test_run_spec_is_frozen_and_a_trial_batch_is_not_a_run(tmp_path, tiny_models, sentiment_dir):
    import dataclasses

    rec = R.from_dict(tiny_recipe(tiny_models["bert"], sentiment_dir, "lora", max_steps=2))
    spec = RunSpec("a", 0, rec, tmp_path / "a" / "seed0")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.dir = tmp_path
    other = spec.with_recipe(R.from_dict(R.apply_overrides(rec.to_dict(), ["train.lr=1e-2"])), tmp_path / "x")
    assert other.hash != spec.hash and other.dir == tmp_path / "x" and other.variant == "a"
    assert spec.command() == spec.argv() and spec.recipe_file.read_text() == R.dump_yaml(rec)
    batch = TrialBatch([spec, other], tmp_path / "batch", "rung 1/1")
    assert not isinstance(batch, RunSpec) and batch.runs_in_process == 2 and batch.title == "rung 1/1"
    assert batch.command()[-1] == str(tmp_path / "batch" / "trials.json")
    with pytest.raises(ValueError, match="no train options"):
        batch.command(["--launcher", "torchrun"])
    with pytest.raises(RecipeError, match="unknown key 'executr'"):
        f = tmp_path / "c.yaml"
        f.write_text(yaml.safe_dump({"base": "x.yaml", "variants": [{"name": "a"}], "executr": {}}))
        C.load(f)
