"""Bad input catalogue: each case gives one clear line on stderr, exit code 2, nothing half-written.

Most cases call the CLI entry point in-process (``peftkit.cli.main``: argument parsing, the
command and its error handling, minus a 5 s interpreter start); ``test_real_process`` checks
a few through ``run_cli`` in a separate process.
"""

from __future__ import annotations

import errno
import json
import os

import pytest
import yaml

from conftest import run_cli, sentiment_rows, tiny_recipe, write_csv
from peftkit import cli


@pytest.fixture(autouse=True)
def _no_progress_bars():
    # A real `peftkit` process disables them before transformers is imported (cli._quiet);
    # here transformers was imported first, by conftest.
    import transformers

    transformers.utils.logging.disable_progress_bar()
    yield
    transformers.utils.logging.enable_progress_bar()


def write_recipe(path, rdict):
    path.write_text(yaml.safe_dump(rdict))
    return str(path)


def main(capsys, *args):
    capsys.readouterr()
    rc = cli.main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def one_error_line(err):
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("peftkit: error: "), err
    return lines[0]


@pytest.fixture
def rec(tiny_models, sentiment_dir, tmp_path):
    """(recipe dict, data dir) with a private copy of the data that a test may spoil."""
    d = tmp_path / "data"
    d.mkdir()
    for split in ("train", "validation", "test"):
        (d / f"{split}.csv").write_bytes((sentiment_dir / f"{split}.csv").read_bytes())
    return tiny_recipe(tiny_models["bert"], d, "lora", max_steps=1), d


def expect_error(capsys, tmp_path, rdict, match, *extra):
    out = tmp_path / "out"
    rc, _, err = main(capsys, "train", write_recipe(tmp_path / "r.yaml", rdict), *extra, "--out", str(out))
    line = one_error_line(err)
    assert rc == 2 and match in line, line
    assert not out.exists()  # nothing half-written
    return line


def test_missing_and_unreadable_recipe(capsys, tmp_path):
    rc, _, err = main(capsys, "train", str(tmp_path / "nope.yaml"))
    assert rc == 2 and "nope.yaml: recipe file not found" in one_error_line(err)
    rc, _, err = main(capsys, "train", str(tmp_path))  # a directory: unreadable as a file
    assert rc == 2 and "cannot read recipe" in one_error_line(err)


def test_recipe_permission_denied(capsys, tmp_path, monkeypatch):
    from pathlib import Path

    p = tmp_path / "r.yaml"
    p.write_text("{}")

    def denied(self, *a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", denied)  # root ignores chmod, so deny by hand
    rc, _, err = main(capsys, "train", str(p))
    assert rc == 2 and "cannot read recipe (PermissionError" in one_error_line(err)


def test_missing_data_file(capsys, tmp_path, rec):
    r, d = rec
    (d / "train.csv").unlink()
    expect_error(capsys, tmp_path, r, "train.csv: data file not found")


def test_data_path_is_a_directory(capsys, tmp_path, rec):
    r, d = rec
    (d / "train.csv").unlink()
    (d / "train.csv").mkdir()
    expect_error(capsys, tmp_path, r, "train.csv: not a file")


def test_wrong_column_names(capsys, tmp_path, rec):
    r, d = rec
    write_csv(d / "train.csv", [{"sentence": x["text"], "label": x["label"]} for x in sentiment_rows(20)])
    expect_error(capsys, tmp_path, r, "missing column(s) 'text'; columns present: sentence, label")


def test_label_outside_label_set_names_the_row(capsys, tmp_path, rec):
    r, d = rec
    rows = sentiment_rows(20)
    rows[2]["label"] = "meh"
    write_csv(d / "train.csv", rows)
    r["task"]["labels"] = ["neg", "pos"]
    expect_error(capsys, tmp_path, r, "row 3: label 'meh' not in the label set ['neg', 'pos']")


def test_empty_split(capsys, tmp_path, rec):
    r, d = rec
    (d / "test.csv").write_text("text,label\n")
    expect_error(capsys, tmp_path, r, "test.csv")


def test_empty_split_by_fraction(capsys, tmp_path, rec):
    r, d = rec
    write_csv(d / "train.csv", sentiment_rows(3))
    r["task"]["data"].update(validation=None, test=None, validation_fraction=0.0, test_fraction=0.5)
    expect_error(capsys, tmp_path, r, "split 'validation' is empty")


def test_non_utf8_text(capsys, tmp_path, rec):
    r, d = rec
    (d / "train.csv").write_bytes("text,label\ncaf\xe9 good,pos\nbad film,neg\n".encode("latin-1"))
    expect_error(capsys, tmp_path, r, "train.csv: line 2, column 4 (byte 14): not valid UTF-8 text (0xe9)")


@pytest.mark.parametrize("override, match", [
    ("train.lr=abc", "train.lr: Input should be a valid number"),
    ("train.batch_size=0", "train.batch_size: Input should be greater than or equal to 1"),
    ("train.nonfinite=ignore", "train.nonfinite: Input should be 'skip' or 'stop'"),
    ("train.bogus=1", "unknown key 'train.bogus'"),
    ("strategy.name=nope", "strategy.name: unknown value 'nope'"),
    ("model.quantization=4bit", "cannot run on a quantized backbone"),
])
def test_recipe_errors(capsys, tmp_path, rec, override, match):
    r, _ = rec
    r["strategy"]["name"] = "full"
    expect_error(capsys, tmp_path, r, match, override)


def test_unwritable_output(capsys, tmp_path, rec):
    r, _ = rec
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc, _, err = main(capsys, "train", write_recipe(tmp_path / "r.yaml", r), "--out", str(blocker / "run"))
    assert rc == 2 and "cannot create directory" in one_error_line(err)
    rc, _, err = main(capsys, "train", write_recipe(tmp_path / "r.yaml", r), "--out", str(blocker))
    assert rc == 2 and "exists and is not a directory" in one_error_line(err)


def test_non_empty_output(capsys, tmp_path, rec):
    r, _ = rec
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    rc, _, err = main(capsys, "train", write_recipe(tmp_path / "r.yaml", r), "--out", str(out))
    assert rc == 2 and "not empty (use --force" in one_error_line(err)
    assert os.listdir(out) == ["mine.txt"]


def test_corrupted_result_json(capsys, tmp_path, rec):
    r, _ = rec
    out = tmp_path / "out"
    out.mkdir()
    (out / "result.json").write_text('{"schema": "peftkit.res')
    rc, _, err = main(capsys, "train", write_recipe(tmp_path / "r.yaml", r), "--out", str(out))
    assert rc == 2 and "result.json is corrupt" in one_error_line(err)


@pytest.mark.parametrize("fail_at", [1, 4])  # 1: recipe.yaml at the start, 4: result.json at the end
def test_disk_full_while_writing(capsys, tmp_path, rec, monkeypatch, fail_at):
    """ENOSPC half-way through a file: a clear line, the temp file removed, no result.json."""
    import peftkit.io

    r, _ = rec
    real_fdopen = os.fdopen
    calls = []

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            calls.append(1)
            if len(calls) < fail_at:
                return self.f.write(data)
            self.f.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    class FullOS:
        def __getattr__(self, name):
            return getattr(os, name)

        @staticmethod
        def fdopen(fd, *a, **k):
            return Full(real_fdopen(fd, *a, **k))

    monkeypatch.setattr(peftkit.io, "os", FullOS())
    out = tmp_path / "out"
    rc, _, err = main(capsys, "train", write_recipe(tmp_path / "r.yaml", r), "--out", str(out))
    line = one_error_line(err)
    assert rc == 2 and "cannot write (No space left on device)" in line, line
    left = sorted(p.name for p in out.rglob("*"))
    assert "result.json" not in left and not any(n.endswith(".tmp") for n in left), left
    assert len(calls) == fail_at
    if fail_at == 4:  # complete files only; rerunning the command trains again
        assert set(left) == {"recipe.yaml", "log.jsonl", "strategy.safetensors", "predictions.json"}


def test_long_texts_are_truncated_with_a_warning(capsys, tmp_path, rec):
    r, d = rec
    rows = sentiment_rows(40)
    for x in rows[:5]:
        x["text"] = " ".join([x["text"]] * 10)
    write_csv(d / "train.csv", rows)
    r["task"]["max_length"] = 16
    out = tmp_path / "out"
    rc, _, err = main(capsys, "train", write_recipe(tmp_path / "r.yaml", r), "--out", str(out))
    assert rc == 0, err
    assert "peftkit: warning: 5 example(s) longer than task.max_length=16 tokens were truncated" in err
    assert json.loads((out / "result.json").read_text())["task"]["truncated_examples"] == 5


@pytest.mark.parametrize("case", ["missing_recipe", "unknown_strategy", "missing_data"])
def test_real_process(tmp_path, rec, case):
    r, d = rec
    if case == "unknown_strategy":
        r["strategy"]["name"] = "nope"
    if case == "missing_data":
        (d / "train.csv").unlink()
    path = str(tmp_path / "absent.yaml") if case == "missing_recipe" else write_recipe(tmp_path / "r.yaml", r)
    p = run_cli("train", path, "--out", str(tmp_path / "out"))
    assert p.returncode == 2
    assert len(p.stderr.strip().splitlines()) == 1 and p.stderr.startswith("peftkit: error: "), p.stderr
    assert not (tmp_path / "out").exists()


def test_empty_text_or_label_rows(capsys, tmp_path, rec):
    r, d = rec
    rows = sentiment_rows(20)
    rows[4]["text"], rows[7]["label"] = "  ", ""
    write_csv(d / "train.csv", rows)
    expect_error(capsys, tmp_path, r, "train.csv): row 5: empty 'text' (task.data.bad_rows: skip drops such rows)")
    r["task"]["data"]["bad_rows"] = "skip"
    out = tmp_path / "skipped"
    rc, _, err = main(capsys, "train", write_recipe(tmp_path / "r.yaml", r), "--out", str(out))
    assert rc == 0, err
    warned = [x for x in err.splitlines() if "bad row" in x]
    assert len(warned) == 1 and "skipped 2 bad row(s)" in warned[0] and "row 5: empty 'text'" in warned[0], err
    res = json.loads((out / "result.json").read_text())
    assert res["task"]["bad_rows"]["skipped"] == {"train": 2}
    assert res["task"]["labels"] == ["neg", "pos"]  # an empty label is not a class
