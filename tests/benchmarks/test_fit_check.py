"""benchmarks/fit_check.py in its CPU dry run: the grid, the verdicts scored, results as data."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))


def _check(out):
    r = json.loads((out / "fit_check_dry_run.json").read_text())
    assert r["schema"] == "peftkit.fit_check/1" and r["dry_run"] is True and r["margin"] == 0.05
    cases, s = r["cases"], r["summary"]
    assert s["rows"] == len(cases) >= 8 and s["borderline"] >= 4 and s["measured_rows"] == 2
    for c in cases:
        res = c["result"]
        assert "oom" in res, c
        # the dry run's "OOM" is the measured live peak over the cap: the verdict is checked against it
        if c["cap"] is None:
            assert not res["oom"] and abs(c["allocated_error"]) <= 0.05, c
        else:
            assert res["oom"] == (res["allocated"] > c["cap"])
    assert s["right"] == sum((c["verdict"] == "fits") != c["result"]["oom"] for c in cases if c["verdict"] != "tight")
    (g,) = r["auto"]
    assert g["micro"] * g["accum"] == g["global_batch"] and [x["batch"] for x in g["runs"]][0] == g["micro"]
    assert set(s["targets"]) == {"allocated_within_5pct_every_row", "verdict_right_95pct", "never_fits_when_oom",
                                 "auto_never_ooms_within_one_power"}
    md = (out / "fit_check_dry_run.md").read_text()
    assert "DRY RUN on CPU" in md and "## Environment" in md and "target ≥ 95%" in md
    return r


@pytest.mark.slow  # ~35 s: the whole dry-run grid in process; the planning and scoring have unit tests
def test_fit_check_dry_run_in_process(tmp_path):
    import fit_check

    assert fit_check.main(["--dry-run", "--out", str(tmp_path)]) == 0
    r = _check(tmp_path)
    assert all(r["summary"]["targets"].values()), r["summary"]  # the CPU estimate is ~exact on tiny shapes


@pytest.mark.slow  # ~25 s CPU (70 s wall at load 10 on 2 cores): every case in its own process, as on a GPU
def test_fit_check_dry_run_fresh_processes(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fit_check.py"), "--dry-run", "--fresh",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    _check(tmp_path)
    assert "targets: " in p.stdout


def test_fit_check_help():
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fit_check.py"), "--help"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 0 and "--dry-run" in p.stdout, p.stderr[-2000:]
