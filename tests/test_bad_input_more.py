"""Issue #28 bad-input cases: each gives one line on stderr, the exit code, nothing half-written.

In-process through ``peftkit.cli.main`` (as tests/test_bad_input.py does), one case per test.
"""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import sentiment_rows, tiny_recipe, write_csv
from peftkit import cli
from test_bad_input import _no_progress_bars, expect_error, main, one_error_line, rec, write_recipe  # noqa: F401


# -- recipes -------------------------------------------------------------------------------
def test_duplicate_yaml_key_names_key_and_both_lines(capsys, tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: x\ntrain:\n  lr: 1.0e-3\n  batch_size: 8\n  lr: 3.0e-4\n")
    rc, _, err = main(capsys, "validate", str(p))
    assert rc == 2
    (line,) = [x for x in err.splitlines() if x.strip()]
    assert line == f"FAIL {p}: line 5: duplicate key 'lr' (first given on line 3)"
    rc, _, err = main(capsys, "train", str(p), "--out", str(tmp_path / "out"))
    assert rc == 2 and "line 5: duplicate key 'lr' (first given on line 3)" in one_error_line(err)
    assert not (tmp_path / "out").exists()


def test_duplicate_top_level_section(capsys, tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("train:\n  lr: 1.0\nmodel:\n  name: x\ntrain:\n  lr: 2.0\n")
    rc, _, err = main(capsys, "train", str(p), "--out", str(tmp_path / "out"))
    assert rc == 2 and "line 5: duplicate key 'train' (first given on line 1)" in one_error_line(err)


@pytest.mark.parametrize("text", ["", "\n# only a comment\n", "{}\n"])
def test_empty_recipe_file(capsys, tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    rc, _, err = main(capsys, "train", str(p), "--out", str(tmp_path / "out"))
    assert rc == 2 and one_error_line(err) == f"peftkit: error: {p}: the recipe file is empty"
    assert not (tmp_path / "out").exists()


def test_empty_search_grid(capsys, tmp_path, rec):
    r, _ = rec
    base = write_recipe(tmp_path / "base.yaml", r)
    f = tmp_path / "search.yaml"
    f.write_text(yaml.safe_dump({"name": "s", "base": base, "variants": [{"name": "lora", "set": {}}],
                                 "search": {"lr": []}}))
    rc, _, err = main(capsys, "validate", str(f))
    assert rc == 2
    (line,) = [x for x in err.splitlines() if x.strip()]
    assert line.startswith(f"FAIL {f}: ") and "lr: an empty list searches nothing" in line, line
    rc, _, err = main(capsys, "compare", str(f), "--out", str(tmp_path / "out"))
    assert rc == 2 and "lr: an empty list searches nothing" in one_error_line(err)
    assert not (tmp_path / "out").exists()


# -- data ----------------------------------------------------------------------------------
def test_validate_data_checks_files_exist_and_parse(capsys, tmp_path, rec):
    r, d = rec
    p = write_recipe(tmp_path / "r.yaml", r)
    rc, out, _ = main(capsys, "validate", "--data", p)
    assert rc == 0 and out.startswith(f"ok   {p}")
    (d / "validation.csv").unlink()
    rc, _, err = main(capsys, "validate", p)  # without --data: the recipe alone is fine
    assert rc == 0
    rc, _, err = main(capsys, "validate", "--data", p)
    assert rc == 2 and err.strip() == f"FAIL {d / 'validation.csv'}: data file not found"
    (d / "validation.csv").write_text("text,label\n\"unterminated,pos\n")
    rc, _, err = main(capsys, "validate", "--data", p)
    assert rc == 2 and err.strip().startswith(f"FAIL {d / 'validation.csv'}: ")


def test_non_utf8_byte_named_by_line_and_column(capsys, tmp_path, rec):
    r, d = rec
    rows = ["text,label"] + [f"row number {i} is good,pos" for i in range(1, 10)]
    data = bytearray("\n".join(rows).encode() + b"\n")
    bad = 11 + 3 * 25 + 5  # line 5, column 6: offset 91 in the file
    data[bad] = 0xFF
    (d / "train.csv").write_bytes(bytes(data))
    expect_error(capsys, tmp_path, r, f"{d / 'train.csv'}: line 5, column 6 (byte 91): not valid UTF-8 text (0xff)")


def test_non_utf8_past_the_first_megabyte(tmp_path):
    """The offset counts from the file's start, across the reader's blocks."""
    from peftkit.tasks.data import bad_utf8

    line = b"x" * 99 + b"\n"
    p = tmp_path / "big.csv"
    p.write_bytes(line * 20000 + b"ab\xc3(\n")  # a broken 2-byte sequence on line 20001
    assert bad_utf8(p, chunk=4096) == f"{p}: line 20001, column 3 (byte 2000002): not valid UTF-8 text (0xc3)"


def test_broken_jsonl_line_named(capsys, tmp_path, rec):
    r, d = rec
    lines = [json.dumps(x) for x in sentiment_rows(60)]
    lines[42] = '{"text": "a fine film", "label": pos}'
    (d / "train.jsonl").write_text("\n".join(lines) + "\n")
    r["task"]["data"]["train"] = "train.jsonl"
    expect_error(capsys, tmp_path, r, f"{d / 'train.jsonl'}: line 43, column 34: invalid JSON (Expecting value)")


def test_csv_unquoted_commas_one_line_no_library_log(capsys, tmp_path, rec):
    r, d = rec
    rows = sentiment_rows(20)
    write_csv(d / "train.csv", rows)
    text = (d / "train.csv").read_text().splitlines()
    text[4] = "this, has, commas,neg"
    (d / "train.csv").write_text("\n".join(text) + "\n")
    import logging

    logging.getLogger("datasets").setLevel(logging.INFO)  # as a user's own logging setup might leave it
    line = expect_error(capsys, tmp_path, r, f"{d / 'train.csv'}: line 5: expected 2 fields, saw 4")
    assert "quote a field" in line


def test_header_only_csv(capsys, tmp_path, rec):
    r, d = rec
    (d / "train.csv").write_text("text,label\n")
    expect_error(capsys, tmp_path, r, f"{d / 'train.csv'}: no rows (a header line only)")


# -- outputs --------------------------------------------------------------------------------
def _fake_compare_dir(tmp_path):
    d = tmp_path / "cmp" / "lora" / "seed0"
    d.mkdir(parents=True)
    (d / "result.json").write_text('{"schema": "peftkit.result/1", "run": {"strategy": "lo')
    return tmp_path / "cmp", d


def test_report_on_truncated_result(capsys, tmp_path):
    out, d = _fake_compare_dir(tmp_path)
    rc, _, err = main(capsys, "report", str(out))
    line = one_error_line(err)
    assert rc == 2 and f"{d / 'result.json'}: not valid JSON (truncated?): line 1, column" in line
    assert "compare retrains it" in line
    assert not (out / "report.json").exists()


def test_compare_says_it_retrains_a_truncated_result(tmp_path, capsys, rec):
    from peftkit import recipe as R
    from peftkit.runs.spec import RunSpec

    out, d = _fake_compare_dir(tmp_path)
    run = RunSpec("lora", 0, R.from_dict(rec[0]), d)
    assert run.done() is False and run.done() is False  # looked at often: says nothing itself
    assert capsys.readouterr().err == ""
    # the plan says it, once: compare.prepare warns for each unreadable result with this text
    assert run.unreadable_result() == f"{d / 'result.json'}: unreadable (JSONDecodeError: truncated or edited?)"


def test_compare_out_is_a_file(capsys, tmp_path, rec):
    r, _ = rec
    f = tmp_path / "cmp.yaml"
    f.write_text(yaml.safe_dump({"name": "c", "base": r, "variants": [{"name": "lora", "set": {}}]}))
    (tmp_path / "file").write_text("x")
    rc, _, err = main(capsys, "compare", str(f), "--out", str(tmp_path / "file"))
    assert rc == 2 and one_error_line(err) == f"peftkit: error: --out {tmp_path / 'file'}: exists and is not a directory"
    assert (tmp_path / "file").read_text() == "x"


# -- DeepSpeed ZeRO where it cannot run ----------------------------------------------------------
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the refusal is for machines without CUDA")
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_config_refused_before_launch(capsys, tmp_path, rec, stage):
    from conftest import ROOT

    r, _ = rec
    cfg = ROOT / "recipes" / "accelerate" / f"deepspeed-zero{stage}.yaml"
    rc, _, err = main(capsys, "train", write_recipe(tmp_path / "r.yaml", r), "--out", str(tmp_path / "out"),
                      "--launcher", "accelerate", "--nproc", "2", "--accelerate-config", str(cfg))
    line = one_error_line(err)
    assert rc == 2 and f"--accelerate-config {cfg}: DeepSpeed ZeRO cannot run here: this machine has no CUDA GPU" in line
    assert not (tmp_path / "out").exists()


def test_the_compare_plan_says_once_that_it_retrains_a_truncated_result(tmp_path, capsys, rec):
    import yaml

    from peftkit.runs import compare

    r, _ = rec
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(r))
    f = tmp_path / "cmp.yaml"
    f.write_text(yaml.safe_dump({"base": "base.yaml", "seeds": [0], "variants": [{"name": "lora", "set": {"strategy.name": "lora"}}]}))
    out, d = _fake_compare_dir(tmp_path)
    plan = compare.prepare(f, out)
    assert [run.dir for run in plan.runs] == [d] and not plan.runs[0].done()
    err = capsys.readouterr().err
    assert err.count("unreadable") == 1 and f"{d / 'result.json'}: unreadable (JSONDecodeError" in err
    assert "this run is trained again" in err
