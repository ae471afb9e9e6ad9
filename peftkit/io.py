"""Atomic file writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from peftkit.errors import UserError


class WriteError(UserError):
    """The file could not be written (disk full, read-only, ...); nothing half-written is left."""


class IntegrityError(UserError):
    """A weights file differs from the sha256 recorded when peftkit wrote it."""


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


def _as_umask_allows(root: Path) -> None:
    """mkdtemp makes the directory private, and libraries writing into it through temporary
    files (transformers' weight shards) leave them 0600: give the tree the modes a plain
    ``open()``/``mkdir()`` would have had under the user's umask."""
    mask = _umask()
    for p in [root, *root.rglob("*")]:
        if p.is_symlink():
            continue
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


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


def sha256(data: bytes) -> str:
    """The hex sha256 recorded beside every file peftkit writes and checks (weights, checkpoints)."""
    return hashlib.sha256(data).hexdigest()


def save_safetensors(path: str | Path, tensors: dict) -> str:
    """Write ``tensors``; returns the file's sha256 (hex), to be recorded beside it."""
    from safetensors.torch import save

    # contiguous + own storage: safetensors refuses shared or strided tensors.
    data = save({k: v.detach().contiguous().clone().cpu() for k, v in tensors.items()})
    atomic_write_bytes(path, data)
    return sha256(data)


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_sha256(path: str | Path, expected: str | None, where: str) -> None:
    """IntegrityError (one line naming the file) unless ``path`` hashes to ``expected``.

    ``expected`` None: nothing was recorded (a file written before peftkit recorded hashes).
    """
    if expected is None:
        return
    got = sha256_file(path)
    if got != expected:
        raise IntegrityError(f"{path}: sha256 {got[:12]}… differs from the {expected[:12]}… recorded in {where} "
                             f"(the file changed after peftkit wrote it: corrupt or edited)")


def read_json(path: str | Path, what: str = "") -> dict:
    """A JSON file peftkit wrote; a cut-off or edited one is one line with its line and column."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}){what}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        cut = "" if text.rstrip().endswith(("}", "]")) else " (truncated?)"
        raise UserError(f"{path}: not valid JSON{cut}: line {e.lineno}, column {e.colno}: {e.msg}{what}") from None


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
        _as_umask_allows(tmp)
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


# -- child processes ----------------------------------------------------------------------
def _prctl():
    """libc's prctl (Linux), looked up in the parent: a preexec_fn should not load libraries."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def die_with_parent(then=None):
    """A ``Popen(preexec_fn=...)`` that ties the child's life to this process.

    The child gets its own process group (a terminal's Ctrl-C goes to the parent, which stops
    its children as it decides) and, on Linux, ``PR_SET_PDEATHSIG`` SIGTERM: when the parent
    dies, even by SIGKILL, the kernel sends the child SIGTERM, on which a trainer checkpoints
    and exits; its run-dir lock goes with it, so a re-run continues from that checkpoint.
    ``then``: a further preexec function (e.g. ignoring a signal).
    """
    import signal

    prctl, parent = _prctl(), os.getpid()

    def preexec():
        os.setpgid(0, 0)
        if prctl is not None:
            prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
            if os.getppid() != parent:  # the parent died before prctl took effect
                os.kill(os.getpid(), signal.SIGTERM)
        if then is not None:
            then()

    return preexec

