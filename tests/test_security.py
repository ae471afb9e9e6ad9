"""Nothing unsafe is loaded: the package source never unpickles, yaml-loads unsafely, or trusts remote code."""

from __future__ import annotations

import re

from conftest import ROOT

RULES = {
    "yaml.load( (use yaml.safe_load)": re.compile(r"\byaml\.(load|load_all|unsafe_load|full_load)\s*\("),
    "pickle": re.compile(r"\b(c?pickle|dill|cloudpickle|joblib)\b"),
    "torch.load( without weights_only=True": re.compile(r"\btorch\.load\s*\((?![^)]*weights_only\s*=\s*True)"),
    "trust_remote_code=True": re.compile(r"trust_remote_code\s*=\s*True"),
    "eval/exec": re.compile(r"(?<![.\w])(eval|exec)\s*\("),
}


def offences(text: str) -> list[str]:
    return [name for name, rx in RULES.items() if rx.search(text)]


def test_rules_catch_what_they_should():
    assert offences("d = yaml.load(f)") == ["yaml.load( (use yaml.safe_load)"]
    assert offences("import pickle") == ["pickle"]
    assert offences("torch.load(p)") == ["torch.load( without weights_only=True"]
    assert offences("torch.load(p, map_location='cpu', weights_only=True)") == []
    assert offences("from_pretrained(p, trust_remote_code=True)") == ["trust_remote_code=True"]
    assert offences("yaml.safe_load(t); trust_remote_code=mc.trust_remote_code; model.eval()") == []


def test_package_source_is_clean():
    found = {}
    for path in sorted((ROOT / "peftkit").rglob("*.py")):
        for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            for name in offences(code):
                found.setdefault(name, []).append(f"{path.relative_to(ROOT)}:{no}: {line.strip()}")
    assert not found, found
