"""KEY=VALUE overrides anywhere on the command line, the same for train, compare, estimate, validate."""

import json

import pytest
import yaml

from conftest import ROOT, tiny_recipe
from peftkit import cli

QUICK = str(ROOT / "recipes" / "quickstart.yaml")
COMPARE = str(ROOT / "recipes" / "quickstart" / "compare.yaml")


def run(capsys, *args):
    capsys.readouterr()
    rc = cli.main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def one_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("argv", [
    ["train", QUICK, "--out", "OUT", "train.lr=1e-4", "strategy.r=4", "--dry-run"],
    ["train", QUICK, "train.lr=1e-4", "--out", "OUT", "strategy.r=4", "--dry-run"],
    ["train", "--dry-run", QUICK, "train.lr=1e-4", "strategy.r=4", "--out", "OUT"],
])
def test_train_overrides_before_or_after_options(capsys, tmp_path, argv):
    argv = [str(tmp_path / "run") if a == "OUT" else a for a in argv]
    rc, out, _ = run(capsys, *argv)
    assert rc == 0 and "lr: 0.0001" in out and "r: 4" in out


def test_validate_takes_overrides_like_the_others(capsys):
    rc, out, _ = run(capsys, "validate", QUICK, "train.lr=2e-4", "--print-config", "strategy.r=4")
    assert rc == 0 and "lr: 0.0002" in out and "r: 4" in out
    rc, out, _ = run(capsys, "validate", QUICK, "--set", "train.lr=3e-4", "--print-config")  # the old spelling
    assert rc == 0 and "lr: 0.0003" in out
    rc, _, err = run(capsys, "validate", QUICK, "train.lr=-1")
    assert rc == 2 and "train.lr" in one_line(err)


def test_compare_override_after_out_reaches_every_variant(capsys, tmp_path):
    # A value every variant refuses proves the override was applied (and stops before training).
    rc, _, err = run(capsys, "compare", COMPARE, "--out", str(tmp_path / "c"), "train.batch_size=0")
    assert rc == 2 and "train.batch_size" in one_line(err)
    assert not (tmp_path / "c").exists()  # nothing half-written
    rc, out, _ = run(capsys, "validate", COMPARE, "train.max_steps=7")
    assert rc == 0 and "(compare: 8 runs)" in out


def test_estimate_override_after_options(capsys, tmp_path, tiny_models, sentiment_dir):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tiny_models["bert"], sentiment_dir)))
    rc, out, _ = run(capsys, "estimate", str(path), "--json", "train.batch_size=4", "--seq-len", "16",
                     "strategy.name=full")
    est = json.loads(out)
    assert rc == 0 and est["batch_size"] == 4 and est["seq_len"] == 16
    assert est["params"]["trainable"] == est["params"]["total"]  # strategy.name=full was applied


@pytest.mark.parametrize("cmd", ["train", "estimate", "validate", "compare"])
def test_bad_override_is_one_line_exit_2(capsys, tmp_path, cmd):
    recipe = COMPARE if cmd == "compare" else QUICK
    extra = ["--out", str(tmp_path / "o")] if cmd in ("train", "compare") else []
    rc, _, err = run(capsys, cmd, recipe, *extra, "train.lr")
    # validate takes several files: there an argument without '=' is one of them
    want = "train.lr: recipe file not found" if cmd == "validate" else "override 'train.lr': expected KEY=VALUE"
    assert rc == 2 and want in one_line(err)
    rc, _, err = run(capsys, cmd, recipe, *extra, "train.nope=1")
    assert rc == 2 and "train.nope" in err


def test_unknown_option_still_refused(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", QUICK, "--out", str(tmp_path / "o"), "--bogus"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        cli.main(["report", str(tmp_path), "x=1"])  # report takes no overrides
