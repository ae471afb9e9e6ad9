"""Live progress of a compare (or a search): one line per run, read from the run directories.

Runs train in other processes (whatever executes them), so the display only reads what
each run writes: ``log.jsonl`` (step, total, tokens/s, memory, wall time of each logged
step), ``result.json`` (done), ``error.json`` (failed). Silent when stdout is not a TTY.
"""

from __future__ import annotations

import json
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from peftkit.step import measure


def live_stats(timer, total_steps: int) -> dict:
    """What a trainer adds to its periodic log record for the display (and the trackers)."""
    import torch

    mem = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else measure.rss_bytes()
    return {"total_steps": total_steps, "tokens_per_s": timer.summary().get("train_tokens_per_s"),
            "memory_bytes": mem, "time": time.time()}


@dataclass
class RunState:
    name: str
    state: str = "pending"  # pending, running, done, failed
    step: int = 0
    total: int | None = None
    tokens_per_s: float | None = None
    memory_bytes: int | None = None
    eta_s: float | None = None
    elapsed_s: float | None = None


def read_run(d: Path, name: str) -> RunState:
    s = RunState(name)
    if (d / "result.json").exists():
        s.state = "done"
    elif (d / "error.json").exists():
        s.state = "failed"
    try:
        lines = (d / "log.jsonl").read_text(encoding="utf-8").splitlines()
    except OSError:
        return s
    recs = []
    for line in lines:
        try:
            recs.append(json.loads(line))
        except ValueError:  # a line being written
            continue
    timed = [r for r in recs if "time" in r and "total_steps" in r]
    if s.state == "pending" and recs:
        s.state = "running"
    if not timed:
        return s
    last = timed[-1]
    s.step, s.total = last["step"], last["total_steps"]
    s.tokens_per_s, s.memory_bytes = last.get("tokens_per_s"), last.get("memory_bytes")
    if len(timed) > 1 and last["step"] > timed[0]["step"]:
        rate = (last["step"] - timed[0]["step"]) / max(last["time"] - timed[0]["time"], 1e-9)
        s.eta_s = max(0.0, (s.total - s.step) / rate)
        s.elapsed_s = last["time"] - timed[0]["time"] + timed[0]["step"] / rate
    return s


def overall_eta(states: list[RunState]) -> float | None:
    """Seconds left: running runs' ETAs plus pending runs at the mean run length seen so far,
    shared over as many runs as are running at once."""
    running = [s for s in states if s.state == "running"]
    pending = sum(s.state == "pending" for s in states)
    lengths = [s.elapsed_s + (s.eta_s or 0) for s in states if s.elapsed_s is not None]
    if (pending and not lengths) or any(s.eta_s is None for s in running):
        return None
    work = sum(s.eta_s for s in running) + pending * (statistics.fmean(lengths) if lengths else 0)
    return work / max(1, len(running))


def _dur(s: float | None) -> str:
    if s is None:
        return "–"
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def line(s: RunState) -> str:
    if s.state in ("pending", "done", "failed") and s.total is None:
        return f"{s.name:<24} {s.state}"
    mem = "–" if s.memory_bytes is None else f"{s.memory_bytes / 2**20:,.0f} MiB"
    tps = "–" if s.tokens_per_s is None else f"{s.tokens_per_s:,.0f} tok/s"
    tail = s.state if s.state != "running" else f"ETA {_dur(s.eta_s)}"
    return f"{s.name:<24} step {s.step}/{s.total if s.total is not None else '?'}  {tps}  {mem}  {tail}"


class CompareProgress:
    """``with CompareProgress(out, run_dirs) as p:`` a rich Live table refreshed from the run
    dirs; ``p.echo`` prints above it. ``enabled=None``: only when stdout is a TTY."""

    def __init__(self, out: Path, run_dirs: list[Path], enabled: bool | None = None, interval: float = 1.0):
        self.out, self.interval = Path(out), interval
        self.show([(f"{Path(d).parent.name}/{Path(d).name}", d) for d in run_dirs])
        self.enabled = sys.stdout.isatty() if enabled is None else enabled
        self._stop = threading.Event()

    def show(self, named_dirs: list[tuple[str, Path]], title: str | None = None) -> None:
        """Display these runs from now on (a search: the trials of each rung, then the test runs)."""
        self.runs, self.title = [(n, Path(d)) for n, d in named_dirs], title

    def states(self) -> list[RunState]:
        return [read_run(d, name) for name, d in self.runs]

    def render(self) -> str:
        st = self.states()
        done = sum(s.state in ("done", "failed") for s in st)
        head = [self.title] if self.title else []
        return "\n".join(head + [line(s) for s in st]
                         + [f"overall: {done}/{len(st)} runs finished, ETA {_dur(overall_eta(st))}"])

    def echo(self, msg: str) -> None:
        self.live.console.print(msg, markup=False, highlight=False)

    def _loop(self):
        from rich.text import Text

        while not self._stop.wait(self.interval):
            self.live.update(Text(self.render()), refresh=True)

    def __enter__(self):
        if self.enabled:
            from rich.live import Live
            from rich.text import Text

            self.live = Live(Text(self.render()), auto_refresh=False, transient=False)
            self.live.__enter__()
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self._stop.set()
            self._thread.join()
            from rich.text import Text

            self.live.update(Text(self.render()), refresh=True)
            self.live.__exit__(*exc)
