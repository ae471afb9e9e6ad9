"""Messages for the user (``warn``) and the run's own log (``log.jsonl`` + an optional tracker)."""

from __future__ import annotations

import json
import logging
import sys
from contextlib import contextmanager
from pathlib import Path


class _DropMessages(logging.Filter):
    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


# The `kernels` package (loaded by transformers for bitsandbytes' hub kernel) logs this WARNING on
# every model load when HF_HUB_OFFLINE is set (as on every offline machine, where it must be): it says
# nothing the user can act on. Only this message is dropped; the logger's other warnings stay.
logging.getLogger("kernels._internals.hf_hub").addFilter(_DropMessages("Skipping publisher trust check for "))


def warn(msg: str) -> None:
    print(f"peftkit: warning: {msg}", file=sys.stderr, flush=True)


@contextmanager
def quiet_logger(*names: str, level: int = logging.CRITICAL + 1):
    """Silence libraries' loggers for a block: e.g. ``datasets`` logs a parse failure as an
    ERROR line before raising it; peftkit reports that failure itself, as one line."""
    loggers = [logging.getLogger(n) for n in names]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, saved):
            lg.setLevel(lvl)


class RunLog:
    """``RUN_DIR/log.jsonl``, one JSON record per line, mirrored to a tracker (main process only).

    ``tracker`` (peftkit.training.tracking.Tracking) gets every record: the one plug point for
    experiment trackers.
    """

    def __init__(self, path: Path | None, tracker=None):
        self.f = open(path, "a", encoding="utf-8") if path is not None else None
        self.tracker = tracker

    def __call__(self, **rec) -> None:
        if self.f is None:
            return
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()
        if self.tracker is not None:
            self.tracker.log(rec)

    def tell(self) -> int:
        """Bytes written so far (a checkpoint records it; a resume cuts the log back to it)."""
        return self.f.tell() if self.f is not None else 0

    def close(self) -> None:
        if self.f is not None:
            self.f.close()


class Progress:
    """A rich progress bar with loss and throughput (silent when disabled)."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.p = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                              TextColumn("{task.fields[info]}"), transient=False)
            self.p.__enter__()
            self.t = self.p.add_task("train", total=self.total, info="")
        return self

    def update(self, step, loss, timer):
        if self.enabled:
            s = timer.summary()
            sps = s["train_samples_per_s"]
            info = f"loss {loss:.4f}" + (f" · {sps:.1f} samples/s" if sps else "")
            self.p.update(self.t, completed=step, info=info)

    def __exit__(self, *exc):
        if self.enabled:
            self.p.__exit__(*exc)
