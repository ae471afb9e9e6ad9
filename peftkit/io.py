"""Atomic file writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from peftkit.errors import UserError


class WriteError(UserError):
    """The file could not be written (disk full, read-only, ...); nothing half-written is left."""


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside ``path`` durable (best effort: some filesystems refuse)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*"), reverse=True):  # files before the directories holding them
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        elif p.is_dir():
            fsync_dir(p)
    fsync_dir(root)


def _umask() -> int:
    # There is no way to read the umask without setting it; set it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """The one file writer: temporary file, fsync, rename, fsync of the directory.

    mkstemp makes the file 0600 and the mode survives the rename: it is set to what the
    user's umask gives a plain ``open()`` (0644 under 022) before the rename.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise WriteError(f"{path}: cannot write ({e.strerror or e})") from None
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_safetensors(path: str | Path, tensors: dict) -> None:
    from safetensors.torch import save

    # contiguous + own storage: safetensors refuses shared or strided tensors.
    data = save({k: v.detach().contiguous().clone().cpu() for k, v in tensors.items()})
    atomic_write_bytes(path, data)


@contextmanager
def atomic_dir(dest: str | Path, keep_existing: bool = False):
    """Yield a fresh temporary directory next to ``dest`` that becomes ``dest`` on success.

    Every file in it is fsync'ed before the rename, so a crash leaves the old ``dest`` or the
    whole new one. An existing ``dest`` (the caller decides whether that is allowed) is
    swapped out by rename and removed afterwards, or, with ``keep_existing``, kept and the
    new copy dropped (another process made the same directory meanwhile). On an error the
    temporary directory is removed and ``dest`` is left as it was.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
    old = None
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private
        _fsync_tree(tmp)
        if dest.exists() and keep_existing:
            shutil.rmtree(tmp, ignore_errors=True)
            return
        if dest.exists():
            old = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".old"))
            os.replace(dest, old)
        try:
            os.replace(tmp, dest)
        except OSError:
            if old is not None:
                os.replace(old, dest)
            raise
        fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def is_partial(name: str) -> bool:
    """A leftover of an atomic write cut short by a kill (safe to delete)."""
    return name.startswith(".") and name.endswith((".tmp", ".old"))
