"""report.json -> report.html: one self-contained page (inline CSS/JS, plots as inline SVG).

No network is needed to open it. Every string from data or recipes goes through
``html.escape``; the embedded JSON has ``</`` escaped so it cannot close its script tag.
The table and plots are rendered here; the page's script only sorts the table, shows the
hover card of a point and records script errors in the DOM (``#js-errors``).
"""

from __future__ import annotations

import html
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from peftkit.errors import UserError
from peftkit.io import atomic_write_text
from peftkit.report.table import cells, pareto

CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
table{border-collapse:collapse;margin:8px 0}th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f3f3f3;cursor:pointer;user-select:none}td:first-child,th:first-child{text-align:left}
th[data-dir=asc]::after{content:" \\25B2"}th[data-dir=desc]::after{content:" \\25BC"}
.plots{display:flex;flex-wrap:wrap;gap:16px}svg{background:#fff;border:1px solid #ddd}
circle.pt{cursor:pointer}circle.front{fill:#d62728}circle.other{fill:#1f77b4}
#tip{position:fixed;display:none;background:#222;color:#fff;padding:6px 9px;border-radius:4px;
font-size:12px;white-space:pre;pointer-events:none;z-index:9}.muted{color:#777}
details{margin:10px 0}section{margin:18px 0}.slot{border-left:4px solid #2a7;padding-left:10px}"""

JS = """
window.onerror=function(m){var e=document.getElementById('js-errors');e.hidden=false;
 e.textContent+='script error: '+m+'\\n';};
(function(){
var data=JSON.parse(document.getElementById('report-data').textContent);
function sortBy(table,col,dir){var tb=table.tBodies[0],rows=Array.prototype.slice.call(tb.rows);
 rows.sort(function(a,b){var x=a.cells[col].dataset.v,y=b.cells[col].dataset.v;
  var nx=parseFloat(x),ny=parseFloat(y),c;
  if(!isNaN(nx)&&!isNaN(ny))c=nx-ny;else if(isNaN(nx)!==isNaN(ny))c=isNaN(nx)?1:-1;else c=String(x).localeCompare(String(y));
  return dir==='asc'?c:-c;});
 rows.forEach(function(r){tb.appendChild(r);});
 Array.prototype.forEach.call(table.tHead.rows[0].cells,function(h,i){
  if(i===col)h.dataset.dir=dir;else delete h.dataset.dir;});}
document.querySelectorAll('table.sortable').forEach(function(t){
 Array.prototype.forEach.call(t.tHead.rows[0].cells,function(h,i){h.addEventListener('click',function(){
  sortBy(t,i,h.dataset.dir==='asc'?'desc':'asc');});});});
var m=/sort=([A-Za-z_]+):(asc|desc)/.exec(location.hash),t=document.getElementById('variants');
if(m){var h=t.querySelector('th[data-key='+m[1]+']');if(h)sortBy(t,h.cellIndex,m[2]);}
var tip=document.getElementById('tip'),byName={};
data.variants.forEach(function(v){byName[v.variant]=v;});
document.querySelectorAll('circle.pt').forEach(function(c){
 c.addEventListener('mouseenter',function(ev){var v=byName[c.dataset.variant]||{};
  var s=(data.settings||{})[c.dataset.variant]||{};
  function f(x){return x==null?'\\u2013':Number(x).toFixed(4);}
  tip.textContent=c.dataset.variant+' ('+v.strategy+')\\n'+v.metric_name+': '+f(v.metric)+
   (v.metric_std!=null?' \\u00b1 '+f(v.metric_std):'')+'\\n'+
   Object.keys(s).map(function(k){return k+': '+JSON.stringify(s[k]);}).join('\\n');
  tip.style.display='block';tip.style.left=(ev.clientX+14)+'px';tip.style.top=(ev.clientY+10)+'px';});
 c.addEventListener('mouseleave',function(){tip.style.display='none';});});
var hv=/hover=([^&]+)/.exec(location.hash);  // #hover=VARIANT: show its card (tests, screenshots)
if(hv){var c=document.querySelector('circle.pt[data-variant="'+CSS.escape(decodeURIComponent(hv[1]))+'"]');
 if(c){var b=c.getBoundingClientRect();c.dispatchEvent(new MouseEvent('mouseenter',{clientX:b.left,clientY:b.top}));}}
document.body.dataset.ready='1';
})();
"""

KEYS = ["variant", "trainable", "artifact_bytes", "peak_bytes", "estimate_bytes", "measured_bytes", "tokens_per_s",
        "train_s", "metric"]


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def raw(x) -> str:
    """A number as the data section shows it (ints as ints, floats as Python's repr)."""
    return "–" if x is None else repr(x) if isinstance(x, float) else str(x)


def safe_json(data) -> str:
    """JSON for an inline <script>: '<', '>', '&' as \\u escapes, so no '</script>' or '<!--'
    in a string can end the tag or change how the HTML parser reads it (JSON.parse undoes them)."""
    return json.dumps(data, default=str).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def variant_table(aggs: list[dict]) -> str:
    metric = aggs[0]["metric_name"] if aggs else "metric"
    from peftkit.report.table import COLUMNS

    head = "".join(f'<th data-key="{k}">{_e(c.replace("METRIC", metric))}</th>' for k, c in zip(KEYS, COLUMNS))
    rows = []
    for a in aggs:
        tds = "".join(f'<td data-v="{_e(a[k] if a[k] is not None else "")}">{_e(c)}</td>'
                      for k, c in zip(KEYS, cells(a)))
        rows.append(f'<tr data-variant="{_e(a["variant"])}">{tds}</tr>')
    return (f'<table id="variants" class="sortable"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


def value(x, depth: int = 0) -> str:
    """Any JSON value as HTML: dicts as key/value tables, lists of dicts as tables."""
    if isinstance(x, dict):
        rows = "".join(f"<tr><th>{_e(k)}</th><td>{value(v, depth + 1)}</td></tr>" for k, v in x.items())
        return f'<table class="kv">{rows}</table>'
    if isinstance(x, list) and x and all(isinstance(i, dict) for i in x):
        keys = list(dict.fromkeys(k for i in x for k in i))
        head = "".join(f"<th>{_e(k)}</th>" for k in keys)
        body = "".join("<tr>" + "".join(f"<td>{value(i.get(k), depth + 1)}</td>" for k in keys) + "</tr>" for i in x)
        return f'<table class="sortable"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
    if isinstance(x, list):
        return ", ".join(value(i, depth + 1) for i in x)
    if isinstance(x, bool) or x is None:
        return _e(x)
    return _e(raw(x)) if isinstance(x, (int, float)) else _e(x)


def svg_plot(aggs: list[dict], key: str, xlabel: str, lower_x_better: bool, scale: float = 1.0) -> str:
    pts = [a for a in aggs if a.get(key) is not None and a.get("metric") is not None]
    if not pts:
        return f'<p class="muted">{_e(xlabel)}: no data</p>'
    W, H, L, R, T, B = 560, 360, 64, 20, 30, 48
    xy = [(a[key] / scale, a["metric"], a.get("metric_std") or 0.0) for a in pts]
    front = set(pareto([(x, y) for x, y, _ in xy], lower_x_better))
    x0, x1 = min(p[0] for p in xy), max(p[0] for p in xy)
    y0, y1 = min(p[1] - p[2] for p in xy), max(p[1] + p[2] for p in xy)
    px, py = (x1 - x0) * 0.12 or abs(x0) * 0.1 or 1.0, (y1 - y0) * 0.15 or abs(y0) * 0.05 or 0.05
    x0, x1, y0, y1 = x0 - px, x1 + px, y0 - py, y1 + py

    def sx(x):
        return L + (x - x0) / (x1 - x0) * (W - L - R)

    def sy(y):
        return H - B - (y - y0) / (y1 - y0) * (H - T - B)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}">']
    for i in range(5):  # grid and tick labels
        gx, gy = x0 + (x1 - x0) * i / 4, y0 + (y1 - y0) * i / 4
        out.append(f'<line x1="{sx(gx):.1f}" y1="{T}" x2="{sx(gx):.1f}" y2="{H - B}" stroke="#eee"/>'
                   f'<text x="{sx(gx):.1f}" y="{H - B + 16}" font-size="11" text-anchor="middle">{gx:,.4g}</text>'
                   f'<line x1="{L}" y1="{sy(gy):.1f}" x2="{W - R}" y2="{sy(gy):.1f}" stroke="#eee"/>'
                   f'<text x="{L - 6}" y="{sy(gy) + 4:.1f}" font-size="11" text-anchor="end">{gy:.4g}</text>')
    fx = sorted((xy[i][0], xy[i][1]) for i in front)
    if len(fx) > 1:
        d = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in fx)
        out.append(f'<polyline points="{d}" fill="none" stroke="#d62728" stroke-dasharray="5,4"/>')
    for i, (a, (x, y, s)) in enumerate(zip(pts, xy)):
        cx, cy = sx(x), sy(y)
        if s:
            out.append(f'<line class="err" x1="{cx:.1f}" y1="{sy(y - s):.1f}" x2="{cx:.1f}" y2="{sy(y + s):.1f}" '
                       f'stroke="#555"/><line x1="{cx - 4:.1f}" y1="{sy(y - s):.1f}" x2="{cx + 4:.1f}" '
                       f'y2="{sy(y - s):.1f}" stroke="#555"/><line x1="{cx - 4:.1f}" y1="{sy(y + s):.1f}" '
                       f'x2="{cx + 4:.1f}" y2="{sy(y + s):.1f}" stroke="#555"/>')
        tip = f"{a['variant']} ({a['strategy']}): {a['metric_name']} {y:.4f}" + (f" ± {s:.4f}" if s else "")
        cls = "front" if i in front else "other"
        out.append(f'<circle class="pt {cls}" cx="{cx:.1f}" cy="{cy:.1f}" r="{7 if i in front else 5}" '
                   f'data-variant="{_e(a["variant"])}"><title>{_e(tip)}</title></circle>'
                   f'<text x="{cx + 9:.1f}" y="{cy - 8 if i % 2 == 0 else cy + 16:.1f}" font-size="12">'
                   f'{_e(a["variant"])}</text>')
    metric = pts[0]["metric_name"]
    better = "← better" if lower_x_better else "better →"
    out.append(f'<text x="{(L + W - R) / 2}" y="{H - 10}" font-size="12" text-anchor="middle">{_e(xlabel)}</text>'
               f'<text x="14" y="{(T + H - B) / 2}" font-size="12" text-anchor="middle" '
               f'transform="rotate(-90 14 {(T + H - B) / 2})">{_e(metric)} (eval)</text>'
               f'<text x="{L}" y="18" font-size="12">{_e(metric)} vs {_e(xlabel.split(" (")[0])} '
               f'({better}, up = better; red: Pareto front)</text></svg>')
    return "".join(out)


def _settings(out: Path, runs: list[dict]) -> tuple[dict, dict]:
    """(strategy settings + lr per variant, env of the first run) from the runs' result.json."""
    settings, env = {}, {}
    for r in runs:
        if r["variant"] in settings:
            continue
        try:
            res = json.loads((out / r["variant"] / f"seed{r['seed']}" / "result.json").read_text())
        except (OSError, ValueError):
            continue
        rec = res.get("run", {}).get("recipe", {})
        settings[r["variant"]] = {**{f"strategy.{k}": v for k, v in (rec.get("strategy") or {}).items()},
                                  "train.lr": (rec.get("train") or {}).get("lr")}
        env = env or res.get("env") or {}
    return settings, env


def render(data: dict, settings: dict | None = None, env: dict | None = None) -> str:
    aggs = data.get("variants", [])
    cpu = bool(aggs) and aggs[0].get("measured_method") != "cuda"
    mem = "peak memory (MiB, measured live peak)" if cpu else "peak memory (MiB, max allocated)"
    page = {**data, "settings": settings or {}, "env": env or {}}
    parts = [f"<h1>{_e(data.get('title', 'peftkit comparison'))}</h1>",
             '<pre id="js-errors" hidden></pre>']
    if aggs:
        seeds = max(len(a.get("seeds") or []) for a in aggs)
        base = "ratios (· Nx) are relative to `full`" if data.get("baseline") else "no `full` run to compare with"
        parts.append(f'<p>Device: {_e(aggs[0].get("device"))}; seeds per variant: {seeds}; {_e(base)}; '
                     "error bars: ± std over seeds.</p>")
    if data.get("recommendation") is not None:
        parts.append(f'<section class="slot" id="recommendation"><h2>Recommendation</h2>'
                     f'{value(data["recommendation"])}</section>')
    parts += ["<h2>Variants</h2>", '<p class="muted">Click a column to sort; hover a point for its settings.</p>',
              variant_table(aggs), '<div class="plots">',
              svg_plot(aggs, "peak_bytes", mem, True, 2**20),
              svg_plot(aggs, "tokens_per_s", "throughput (training tokens/s)", False), "</div>"]
    searched = {a["variant"]: a["search"] for a in aggs if a.get("search") is not None}
    if data.get("search") is not None or searched:
        parts.append('<section class="slot" id="search"><h2>Search</h2>'
                     + (value(data["search"]) if data.get("search") is not None else "")
                     + "".join(f"<h3>{_e(v)}</h3>{value(s)}" for v, s in searched.items()) + "</section>")
    if settings:
        parts.append(f"<h2>Settings</h2>{value([{'variant': v, **s} for v, s in settings.items()])}")
    if data.get("failed"):
        parts.append(f"<h2>Failed runs</h2>{value(data['failed'])}")
    parts += [f"<h2>Environment</h2>{value(env) if env else '<p class=muted>not recorded</p>'}",
              "<details><summary>Every number (report.json)</summary>",
              f"<h3>Variants</h3>{value([{k: v for k, v in a.items() if k != 'search'} for a in aggs])}",
              f"<h3>Runs</h3>{value(data.get('runs', []))}</details>"]
    return ("<!DOCTYPE html><html><head><meta charset=\"utf-8\">"
            f"<title>{_e(data.get('title', 'peftkit report'))}</title><style>{CSS}</style></head><body>"
            + "\n".join(parts) + '<div id="tip"></div>'
            + f'<script type="application/json" id="report-data">{safe_json(page)}</script>'
            + f"<script>{JS}</script></body></html>\n")


def write(out: Path, data: dict) -> Path:
    settings, env = _settings(out, data.get("runs", []))
    path = out / "report.html"
    atomic_write_text(path, render(data, settings, env))
    return path


# -- headless chromium ----------------------------------------------------------------------
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars"]


def chromium_binary() -> str | None:
    return next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


def chromium(url: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    exe = chromium_binary()
    if exe is None:
        raise UserError("chromium is not installed (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory(prefix="peftkit-chromium-") as profile:
        return subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, url],
                              capture_output=True, text=True, timeout=timeout)


def screenshot(page: Path, png: Path, size: str = "1280,1500", fragment: str = "") -> Path:
    """A PNG of ``page`` as headless chromium renders it."""
    png = Path(png).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    p = chromium(Path(page).resolve().as_uri() + fragment, f"--screenshot={png}", f"--window-size={size}",
                 "--virtual-time-budget=3000")
    if not png.exists():
        raise UserError(f"{png}: chromium wrote no screenshot ({p.stderr.strip().splitlines()[-1:] or p.returncode})")
    return png


def dump_dom(url: str) -> str:
    """The DOM after the page's scripts ran (``--dump-dom``)."""
    return chromium(url, "--dump-dom", "--virtual-time-budget=5000").stdout


def main(argv: list[str] | None = None) -> int:
    """``python -m peftkit.report.html DIR [--screenshot PNG]``: DIR/report.json -> DIR/report.html."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m peftkit.report.html")
    p.add_argument("dir")
    p.add_argument("--screenshot", metavar="PNG")
    args = p.parse_args(argv)
    out = Path(args.dir)
    try:
        page = write(out, json.loads((out / "report.json").read_text(encoding="utf-8")))
        if args.screenshot:
            screenshot(page, Path(args.screenshot))
    except (OSError, ValueError, UserError) as e:
        print(f"peftkit: error: {e}", file=sys.stderr)
        return 2
    print(page)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
