"""One writer per run directory: an advisory lock held for the run's life.

``fcntl.flock`` on ``RUN_DIR/.peftkit.lock``: the kernel releases it when the holder exits,
however it exits (a kill -9 included), so a stale lock never blocks a re-run. A second
trainer on the same directory refuses in one line naming the holder's pid. Re-entrant within
a process: the CLI takes it before deciding what to do with the directory, the trainer again
for its run (flock locks belong to an open file, so a second open would conflict with itself).
"""

from __future__ import annotations

import functools
import os
import weakref
from contextlib import contextmanager
from pathlib import Path

from peftkit.errors import UserError

LOCK = ".peftkit.lock"
_HELD: dict[str, "RunLock"] = {}


class Busy(UserError):
    """Another process is writing this run directory."""


class RunLock:
    def __init__(self, run_dir: Path, fd: int, made_dir: bool):
        self.key, self.path, self.count = str(run_dir.resolve()), run_dir / LOCK, 1
        # Released when the holder is done with it, garbage-collected, or the interpreter exits.
        self._final = weakref.finalize(self, _release, fd, self.path, made_dir)

    def release(self) -> None:
        self.count -= 1
        if self.count <= 0:
            _HELD.pop(self.key, None)
            self._final()


def _release(fd: int, path: Path, made_dir: bool) -> None:
    # Unlinked while still held (acquire re-checks the inode, so a waiter that opened the old
    # file retries on a new one): a finished run leaves no lock file. A directory made only to
    # hold the lock (the run refused before writing anything) goes too: nothing half-made.
    try:
        path.unlink(missing_ok=True)
        if made_dir and not any(path.parent.iterdir()):
            path.parent.rmdir()
    except OSError:
        pass
    os.close(fd)


def acquire(run_dir: str | Path) -> RunLock:
    """Hold ``run_dir``'s lock (making the directory if needed), or raise Busy naming the holder."""
    import fcntl

    run_dir = Path(run_dir)
    key = str(run_dir.resolve())
    if key in _HELD:
        _HELD[key].count += 1
        return _HELD[key]
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {run_dir}: exists and is not a directory")
    made = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise UserError(f"--out {run_dir}: cannot create directory ({e.strerror or e})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise Busy(f"{run_dir}: another peftkit process (pid {holder}) is writing this run directory; "
                   "wait for it to finish or stop it") from None
    try:
        same = os.stat(run_dir / LOCK).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        same = False
    if not same:  # the holder released (and unlinked) it between our open and flock: take the new one
        os.close(fd)
        return acquire(run_dir)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    lock = _HELD[key] = RunLock(run_dir, fd, made)
    return lock


@contextmanager
def held(run_dir: str | Path):
    """The lock for a block (the CLI deciding what to do with a directory before training)."""
    lock = acquire(run_dir)
    try:
        yield lock
    finally:
        lock.release()


def released_after(method):
    """Decorate ``Trainer.fit``: the lock its setup took (``self.lock``) is released when fit
    returns or raises, not when the trainer happens to be garbage-collected."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        finally:
            lock, self.lock = getattr(self, "lock", None), None
            if lock is not None:
                lock.release()

    return wrapper
