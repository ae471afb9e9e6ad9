"""The fit table of a recipe or compare recipe: one row per strategy or variant
(``peftkit estimate --fit``), each from ``estimate.fit``: the verdict (fits / tight / does
not fit), the largest batch and longest sequence that fit, the cheapest change when not.
"""

from __future__ import annotations

from peftkit.errors import UserError
from peftkit.estimate.fit import fit


def is_compare(path: str) -> bool:
    from peftkit import recipe as R

    data = R.read_yaml(path)
    return isinstance(data, dict) and "variants" in data


def variants(path: str, overrides: list[str]) -> list[tuple[str, object]]:
    """(name, recipe) per variant of a compare recipe (first seed), or per strategy otherwise."""
    from peftkit import recipe as R
    from peftkit import strategies

    if is_compare(path):
        import tempfile

        from peftkit.runs.compare import plan

        runs = plan(path, tempfile.gettempdir(), overrides)
        seen: dict[str, object] = {}
        for run in runs:
            seen.setdefault(run.variant, run.recipe)
        return list(seen.items())
    if any(o.startswith("strategy.name=") for o in overrides):
        return [(R.load(path, overrides).strategy.name, R.load(path, overrides))]
    out = []
    for name in strategies.REGISTRY:
        try:
            out.append((name, R.load(path, [f"strategy.name={name}", *overrides])))
        except UserError:
            continue  # that strategy's settings do not apply to this recipe
    return out


def table(path: str, overrides: list[str], budget: int | None, device: str, batch: int | None = None,
          seq: int | None = None) -> list[dict]:
    rows = []
    for name, rec in variants(path, overrides):
        try:
            rows.append({"variant": name, **fit(rec, budget, device, batch, seq)})
        except UserError as e:
            rows.append({"variant": name, "error": str(e)})
    return rows


def render(rows: list[dict], budget: int | None, device: str) -> None:
    from rich.console import Console
    from rich.table import Table

    from peftkit.estimate.fit import MARGIN

    def gib(b):
        return f"{b / 2**30:,.2f} GiB"

    cols = ["variant", "peak at recipe shape"] + (["reserved", "verdict", "largest batch", "longest seq"]
                                                  if budget else [])
    t = Table(title=(f"what fits in {gib(budget)}" if budget else "estimated peak per variant") + f" on {device}"
              + (f" (fits: reserved peak + {MARGIN:.0%} margin within it)" if budget else ""))
    for c in cols:
        t.add_column(c, justify="left" if c in ("variant", "verdict") else "right")
    changes = []
    for r in rows:
        if "error" in r:
            t.add_row(r["variant"], r["error"], *(["-", "n/a", "-", "-"] if budget else []))
            continue
        head = [r["variant"], f"{gib(r['peak_bytes'])} ({r['batch_size']} x {r['seq_len']})"]
        if not budget:
            t.add_row(*head)
            continue
        colour = {"fits": "green", "tight": "yellow"}.get(r["verdict"], "bold red")
        t.add_row(*head, gib(r.get("reserved_bytes", r["peak_bytes"])), f"[{colour}]{r['verdict']}[/{colour}]",
                  "does not fit" if r["max_batch"] is None else f"{r['max_batch']} (seq {r['seq_len']})",
                  "does not fit" if r["max_seq"] is None else f"{r['max_seq']} (batch {r['batch_size']})")
        if r["verdict"] == "does not fit":
            ch = r.get("change")
            changes.append(f"{r['variant']}: " + (f"{ch['change']}: {' '.join(ch['overrides'])} "
                                                  f"(reserved {gib(ch['reserved_bytes'])})" if ch else
                                                  "no single change in the schema fits; a larger device"))
    c = Console()
    c.print(t)
    for line in changes:
        c.print("cheapest change that fits - " + line)
