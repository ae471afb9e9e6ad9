"""report.html in a real headless browser (Debian chromium): everything shown, no script error, escaped."""

from __future__ import annotations

import copy
import html
import json
import os
import re

import pytest

from conftest import tiny_recipe
from peftkit import recipe as R
from peftkit.report.html import chromium_binary, dump_dom, raw, render, safe_json, screenshot

needs_chromium = pytest.mark.skipif(chromium_binary() is None and not os.environ.get("CI"),
                                    reason="chromium not installed (CI installs it and never skips)")


@pytest.fixture(scope="module")
def compare_dir(tmp_path_factory, tiny_models, sentiment_dir):
    """One real tiny run's result.json, as three variants x two seeds with different numbers."""
    from peftkit.api import fit
    from peftkit.report.summary import report

    root = tmp_path_factory.mktemp("html")
    res = fit(R.from_dict({**tiny_recipe(tiny_models["bert"], sentiment_dir, "lora"),
                           "output": {"report_to": []}}), root / "one")
    out = root / "cmp"
    for k, (variant, strategy) in enumerate([("full", "full"), ("lora-r8", "lora"), ("ia3", "ia3")]):
        for seed in (0, 1):
            r = copy.deepcopy(res)
            r["run"]["strategy"] = r["run"]["recipe"]["strategy"]["name"] = strategy
            r["metrics"]["eval"]["accuracy"] = 0.5 + 0.1 * k + 0.03 * seed
            r["memory"]["peak_bytes"] = 2**20 * (30 - 7 * k) + seed
            r["speed"]["train_tokens_per_s"] = 1000.0 * (k + 1) + seed
            d = out / variant / f"seed{seed}"
            d.mkdir(parents=True)
            (d / "result.json").write_text(json.dumps(r))
    report(out, echo=lambda *a: None)
    return out


def _numbers(x):
    if isinstance(x, dict):
        for v in x.values():
            yield from _numbers(v)
    elif isinstance(x, list):
        for v in x:
            yield from _numbers(v)
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        yield x


def _errors(dom: str) -> str:
    return re.search(r'<pre id="js-errors"[^>]*>(.*?)</pre>', dom, re.S).group(1)


@needs_chromium
def test_browser_shows_every_variant_and_number(compare_dir, tmp_path):
    data = json.loads((compare_dir / "report.json").read_text())
    page = compare_dir / "report.html"
    dom = dump_dom(page.as_uri() + "#sort=metric:desc")
    assert 'data-ready="1"' in dom, "the page's script did not run to its end"
    assert _errors(dom) == ""
    for v in data["variants"]:
        assert html.escape(v["variant"], quote=False) in dom
    missing = sorted({raw(x) for x in _numbers(data)} - {raw(x) for x in _numbers(data) if raw(x) in dom})
    assert not missing, f"numbers of report.json not on the page: {missing[:10]}"
    # The script sorted the table as the URL asked (accuracy, highest first).
    order = re.findall(r'<tr data-variant="([^"]+)"', dom)
    assert order == ["ia3", "lora-r8", "full"]
    assert dom.count('class="err"') >= 3  # error bars: two seeds per variant, in both plots
    assert dom.count("<circle") == 6 and "strategy.r" in dom  # settings for the hover card
    # The hover card, opened by the page's own handler (#hover=), shows the variant's settings.
    dom = dump_dom(page.as_uri() + "#hover=lora-r8")
    tip = re.search(r'<div id="tip" style="([^"]*)">(.*?)</div>', dom, re.S)
    assert "display: block" in tip.group(1) and "lora-r8 (lora)" in tip.group(2) and "strategy.r: 8" in tip.group(2)
    png = screenshot(page, tmp_path / "report.png", fragment="#hover=lora-r8")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


EVIL = "<script>alert(1)</script>"
PWN = "<img src=x onerror=\"document.body.dataset.pwned='1'\">"


def _evil_data(compare_dir) -> dict:
    data = json.loads((compare_dir / "report.json").read_text())
    data["title"] = "</script><script>document.body.dataset.pwned='2'</script>"
    data["variants"][0]["variant"] = EVIL
    data["variants"][1]["variant"] = PWN
    data["runs"][0]["variant"] = EVIL
    data["recommendation"] = {"variant": EVIL, "why": PWN}
    data["variants"][2]["search"] = {"trials": [{"lr": 1e-3, "metric": 0.7, "note": EVIL}]}
    return data


def test_page_source_escapes_everything(compare_dir):
    page = render(_evil_data(compare_dir), {EVIL: {"strategy.r": PWN}}, {"path": EVIL})
    assert EVIL not in page and PWN not in page and "</script><script>document" not in page
    assert html.escape(EVIL) in page and html.escape(PWN) in page
    assert "<" not in safe_json({"x": EVIL + "<!--"}) and json.loads(safe_json({"x": EVIL})) == {"x": EVIL}
    assert page.count("<script") == 2  # the JSON block and the page's own script


@needs_chromium
def test_browser_runs_no_injected_script(compare_dir, tmp_path):
    page = tmp_path / "evil.html"
    page.write_text(render(_evil_data(compare_dir), {EVIL: {"strategy.r": PWN}}, {"path": EVIL}))
    dom = dump_dom(page.as_uri())
    assert 'data-ready="1"' in dom and _errors(dom) == ""
    assert 'data-pwned' not in dom  # an injected handler or script would have set it on <body>
    assert html.escape(EVIL, quote=False) in dom  # shown as text: in the table, plot labels, search, recommendation
    assert dom.count(html.escape(EVIL, quote=False)) >= 4
    assert 'id="search"' in dom and 'id="recommendation"' in dom
