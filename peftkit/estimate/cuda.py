"""What a CUDA device adds to the traced tensors: fixed allocations and the caching allocator.

Two effects the fake-tensor trace cannot see:

* **fixed allocations made through the caching allocator** (so inside ``max_memory_allocated``):
  one cuBLAS workspace and one cuBLASLt workspace per (handle, stream) pair. A training step
  uses two handles: the forward and the optimizer step run on the Python thread, backward on
  autograd's per-device worker thread, and handles are per thread (a thread-local pool
  window). On an H200 that is 2 x (32 + 1) MiB = 66 MiB, the ~70 MB the estimate missed on
  small models (MiniLM 182 MB estimated vs 255 MB measured).
* **the allocator's segments** (``max_memory_reserved``): requests rounded to 512 B; requests
  up to 1 MiB share 2 MiB segments, 1-10 MiB ones share 20 MiB segments, larger ones get a
  segment of their own rounded to 2 MiB; freed blocks are cached and split best-fit, and a
  block is split only if the rest is >= 512 B (small pool) or > 1 MiB (large pool).
  ``AllocatorSim`` replays the traced allocations through these rules (also with
  ``expandable_segments:True``: one segment per pool that grows by 2 / 20 MiB pages).

Sources (PyTorch 2.x): ``aten/src/ATen/cuda/CublasHandlePool.cpp`` (parseChosenWorkspaceSize,
parseCUDABlasLtWorkspaceSize, getCUDABlasLtWorkspaceSize, setWorkspaceForHandle) and
``c10/cuda/CUDACachingAllocator.cpp`` (kMinBlockSize, kSmallSize, kSmallBuffer,
kMinLargeAlloc, kRoundLarge, kLargeBuffer; get_allocation_size, should_split, Note
[Expandable Segments]).
"""

from __future__ import annotations

import bisect
import itertools
import os
import re

MiB = 2**20
# c10/cuda/CUDACachingAllocator.cpp
K_MIN_BLOCK = 512  # kMinBlockSize: every request rounded up to a multiple of 512 B
K_SMALL_SIZE = 1 * MiB  # kSmallSize: largest "small" request
K_SMALL_BUFFER = 2 * MiB  # kSmallBuffer: small requests are packed into 2 MiB segments
K_MIN_LARGE_ALLOC = 10 * MiB  # kMinLargeAlloc: 1-10 MiB requests share a 20 MiB segment
K_LARGE_BUFFER = 20 * MiB  # kLargeBuffer
K_ROUND_LARGE = 2 * MiB  # kRoundLarge: larger requests get their own segment rounded to 2 MiB

# aten/src/ATen/cuda/CublasHandlePool.cpp, parseChosenWorkspaceSize: ":4096:2:16:8" (KiB x count)
# by default, ":4096:8" (32 MiB) on sm90; parseCUDABlasLtWorkspaceSize: CUBLASLT_WORKSPACE_SIZE KiB, 1024.
CUBLAS_DEFAULT = 4096 * 1024 * 2 + 16 * 1024 * 8
CUBLAS_DEFAULT_SM90 = 4096 * 1024 * 8
CUBLASLT_DEFAULT_KIB = 1024
HANDLES = 2  # forward/optimizer on the Python thread, backward on autograd's device thread
CONTEXT_BYTES = 500 * MiB
CONTEXT_NOTE = ("CUDA context (driver, kernels' code; outside the allocator, so in neither max_memory_allocated "
                "nor max_memory_reserved; ~0.3-0.6 GiB, stated 500 MiB)")


def target_sm90(env=None) -> bool:
    """Whether the target is Hopper (sm90): the GPU here if there is one, else PEFTKIT_CUDA_ARCH
    (e.g. 8.6), else assume sm90 (the project's H200; the larger workspace, the safer side)."""
    import torch

    env = os.environ if env is None else env
    if torch.cuda.is_available():
        return torch.cuda.get_device_capability() == (9, 0)
    return env.get("PEFTKIT_CUDA_ARCH", "9.0").strip() in ("9.0", "90", "sm90", "sm_90")


def cublas_workspace_bytes(sm90: bool, env=None) -> int:
    env = os.environ if env is None else env
    cfg = env.get("CUBLAS_WORKSPACE_CONFIG")
    pairs = re.findall(r":([0-9]+):([0-9]+)", cfg or "")
    if not pairs:  # unset or unparsable: torch warns and uses its default
        return CUBLAS_DEFAULT_SM90 if sm90 else CUBLAS_DEFAULT
    return sum(int(size) * 1024 * int(count) for size, count in pairs)


def cublaslt_workspace_bytes(sm90: bool, env=None) -> int:
    """0 when TORCH_CUBLASLT_UNIFIED_WORKSPACE=1 (cuBLASLt then uses the cuBLAS buffer)."""
    env = os.environ if env is None else env
    if env.get("TORCH_CUBLASLT_UNIFIED_WORKSPACE", "").strip().lower() in ("1", "true", "on", "yes"):
        return 0
    raw = env.get("CUBLASLT_WORKSPACE_SIZE") or env.get("TORCH_CUBLASLT_WORKSPACE_SIZE")  # KiB (older name)
    kib = int(raw) if raw and raw.strip().isdigit() else CUBLASLT_DEFAULT_KIB
    # unified sizing is the default outside fbcode: never larger than the cuBLAS workspace
    return min(kib * 1024, cublas_workspace_bytes(sm90, env))


def fixed_costs(env=None) -> list[dict]:
    """The named CUDA allocations a step adds to its tensors, each with where its size comes from."""
    sm90 = target_sm90(env)
    cb, lt = cublas_workspace_bytes(sm90, env), cublaslt_workspace_bytes(sm90, env)
    cfg = (env or os.environ).get("CUBLAS_WORKSPACE_CONFIG")
    return [
        {"name": "cublas_workspace", "bytes": HANDLES * cb, "in_allocated": True,
         "source": f"{HANDLES} handles (forward thread, autograd's backward thread) x {cb:,} B: "
                   + (f"CUBLAS_WORKSPACE_CONFIG={cfg}" if cfg else
                      "torch's default " + (":4096:8 on sm90" if sm90 else ":4096:2:16:8"))
                   + " (ATen/cuda/CublasHandlePool.cpp)"},
        {"name": "cublaslt_workspace", "bytes": HANDLES * lt, "in_allocated": True,
         "source": f"{HANDLES} handles x {lt:,} B: CUBLASLT_WORKSPACE_SIZE (KiB, default 1024); 0 with "
                   "TORCH_CUBLASLT_UNIFIED_WORKSPACE=1 (ATen/cuda/CublasHandlePool.cpp)"},
        {"name": "cuda_context", "bytes": CONTEXT_BYTES, "in_allocated": False, "source": CONTEXT_NOTE},
    ]


def expandable(env=None) -> bool:
    conf = (os.environ if env is None else env).get("PYTORCH_CUDA_ALLOC_CONF", "")
    return bool(re.search(r"expandable_segments\s*:\s*true", conf, re.IGNORECASE))


def round_size(n: int) -> int:
    return max(K_MIN_BLOCK, -(-n // K_MIN_BLOCK) * K_MIN_BLOCK)


def segment_size(n: int) -> int:
    """get_allocation_size: the cudaMalloc behind a request no cached block can serve."""
    if n <= K_SMALL_SIZE:
        return K_SMALL_BUFFER
    if n < K_MIN_LARGE_ALLOC:
        return K_LARGE_BUFFER
    return -(-n // K_ROUND_LARGE) * K_ROUND_LARGE


class OutOfMemory(Exception):
    pass


class _Block:
    __slots__ = ("size", "seg", "off", "prev", "next", "free", "small")

    def __init__(self, size, seg, off, small):
        self.size, self.seg, self.off, self.small = size, seg, off, small
        self.prev = self.next = None
        self.free = True

    def key(self):
        return (self.size, self.seg, self.off)


class AllocatorSim:
    """The caching allocator's pools for one stream, replayed from (alloc / free) events.

    ``cap`` (bytes) emulates ``set_per_process_memory_fraction``: a segment that would pass it
    first releases every cached, unsplit segment (then retries), as ``release_cached_blocks``
    does; with expandable segments the free pages are unmapped instead.
    """

    def __init__(self, expandable_segments: bool = False, cap: int | None = None):
        self.exp, self.cap = expandable_segments, cap
        self.free = {True: [], False: []}  # small? -> sorted [(size, seg, off, block)]
        self.live: dict = {}
        self.segments: dict[int, int] = {}  # seg -> mapped bytes
        self.tail: dict[bool, _Block | None] = {True: None, False: None}  # expandable: last block per pool
        self._ids = itertools.count()
        self.allocated = self.reserved = self.peak_allocated = self.peak_reserved = 0
        self.releases = 0

    # -- free lists ---------------------------------------------------------------------
    def _add(self, b: _Block) -> None:
        bisect.insort(self.free[b.small], (*b.key(), b))

    def _remove(self, b: _Block) -> None:
        lst = self.free[b.small]
        i = bisect.bisect_left(lst, b.key(), key=lambda t: t[:3])
        del lst[i]

    def _best_fit(self, size: int, small: bool) -> _Block | None:
        lst = self.free[small]
        i = bisect.bisect_left(lst, (size, -1, -1), key=lambda t: t[:3])
        if i == len(lst):
            return None
        b = lst[i][3]
        self._remove(b)
        return b

    # -- segments -------------------------------------------------------------------------
    def _grow(self, size: int, small: bool) -> _Block:
        if self.exp:
            return self._expand(size, small)
        seg = segment_size(size)
        self._reserve(seg)
        sid = next(self._ids)
        self.segments[sid] = seg
        return _Block(seg, sid, 0, small)

    def _reserve(self, n: int) -> None:
        if self.cap is not None and self.reserved + n > self.cap:
            self.releases += 1
            self._release()
            if self.reserved + n > self.cap:
                raise OutOfMemory(f"{n:,} B more with {self.allocated:,} B allocated, "
                                  f"{self.reserved:,} B reserved, cap {self.cap:,} B")
        self.reserved += n
        self.peak_reserved = max(self.peak_reserved, self.reserved)

    def _release(self) -> None:
        """release_cached_blocks: every cached segment with no live block goes back to CUDA
        (expandable: the free pages at the end of each pool's segment are unmapped)."""
        if not self.exp:
            for small in (True, False):
                for t in [t for t in self.free[small] if t[3].prev is None and t[3].next is None]:
                    self._remove(t[3])
                    self.reserved -= self.segments.pop(t[3].seg)
            return
        for small in (True, False):
            tail = self.tail[small]
            if tail is not None and tail.free:
                self._remove(tail)
                self.reserved -= tail.size
                self.segments[tail.seg] -= tail.size
                self.tail[small] = tail.prev
                tail.prev.next = None

    def _expand(self, size: int, small: bool) -> _Block:
        """Expandable segments: map pages at the end of the pool's one segment."""
        page = K_SMALL_BUFFER if small else K_LARGE_BUFFER
        tail = self.tail[small]
        if tail is None:
            sid = next(self._ids)
            self.segments[sid] = 0
            start = _Block(0, sid, 0, small)
            start.free = False
            tail = self.tail[small] = start
        reuse = tail.free
        need = size - (tail.size if reuse else 0)
        grow = -(-need // page) * page
        self._reserve(grow)
        self.segments[tail.seg] += grow
        if reuse:
            self._remove(tail)
            tail.size += grow
            return tail
        b = _Block(grow, tail.seg, tail.off + tail.size, small)
        b.prev, tail.next = tail, b
        self.tail[small] = b
        return b

    # -- requests -------------------------------------------------------------------------
    def malloc(self, key, nbytes: int) -> None:
        size = round_size(nbytes)
        small = size <= K_SMALL_SIZE
        b = self._best_fit(size, small) or self._grow(size, small)
        rest = b.size - size
        if rest >= K_MIN_BLOCK if small else rest > K_SMALL_SIZE:  # should_split
            r = _Block(rest, b.seg, b.off + size, small)
            r.prev, r.next = b, b.next
            if b.next is not None:
                b.next.prev = r
            elif self.exp and self.tail[small] is b:
                self.tail[small] = r
            b.next, b.size = r, size
            self._add(r)
        b.free = False
        self.live[key] = b
        self.allocated += b.size
        self.peak_allocated = max(self.peak_allocated, self.allocated)

    def release(self, key) -> None:
        b = self.live.pop(key, None)
        if b is None:
            return
        self.allocated -= b.size
        b.free = True
        for nb in (b.prev, b.next):  # merge with free neighbours (not the expandable head marker)
            if nb is not None and nb.free and nb.size:
                self._remove(nb)
                if nb is b.prev:
                    b.off, b.prev = nb.off, nb.prev
                    if nb.prev is not None:
                        nb.prev.next = b
                else:
                    b.next = nb.next
                    if nb.next is not None:
                        nb.next.prev = b
                    elif self.exp and self.tail[b.small] is nb:
                        self.tail[b.small] = b
                b.size += nb.size
        self._add(b)


def replay(static: list, step: list, fixed: list[int], repeats: int = 2, cap: int | None = None,
           expandable_segments: bool = False) -> AllocatorSim:
    """Static tensors (weights, optimizer state) and the fixed workspaces, then the step's
    events ``repeats`` times (the first step fills the cache, later ones reuse it).
    Events: (+1, key, bytes) for an allocation, (-1, key, 0) for a free."""
    sim = AllocatorSim(expandable_segments, cap)
    for i, n in enumerate(fixed):
        sim.malloc(("fixed", i), n)
    for sign, key, n in static:
        sim.malloc(key, n) if sign > 0 else sim.release(key)
    for r in range(repeats):
        for sign, key, n in step:
            sim.malloc((r, key), n) if sign > 0 else sim.release((r, key))
        for k in [k for k in sim.live if isinstance(k, tuple) and k[0] == r]:  # nothing outlives its step
            sim.release(k)
    return sim


def event_tracker(round_to: int):
    """A ``memory.LiveMemory`` that also logs each allocation and free, in order, for ``replay``;
    ``mark()`` splits what existed before the step (weights, optimizer state) from the step."""
    from peftkit.step import memory

    class EventLog(memory.LiveMemory):
        def __init__(self):
            super().__init__(round_to=round_to)
            self.events: list[tuple[int, int, int]] = []
            self._token: dict[int, int] = {}  # id(entry) -> token (ids of freed entries are reused)
            self._next = itertools.count()
            self.static_events = 0

        def mark(self) -> None:
            self.static_events = len(self.events)

        def _move(self, e, category, size):
            if size != e[1]:
                k = id(e)
                if e[1]:
                    self.events.append((-1, self._token[k], 0))
                self._token[k] = next(self._next)
                self.events.append((1, self._token[k], size))
            super()._move(e, category, size)

        def _free(self, k):
            e = self._live.get(k)
            if e is not None and id(e) in self._token:
                self.events.append((-1, self._token.pop(id(e)), 0))
            super()._free(k)

        def split(self) -> tuple[list, list]:
            return self.events[:self.static_events], self.events[self.static_events:]

    return EventLog()


def reserved_peak(tracker, fixed: list[int], paged_bytes: int = 0, env=None) -> dict:
    """The allocator's reserved peak over two replayed steps, and the allocated peak it sees."""
    static, step = tracker.split()
    sim = replay(static, step, fixed, expandable_segments=expandable(env))
    return {"reserved_peak_bytes": max(0, sim.peak_reserved - paged_bytes),
            "allocator_allocated_peak_bytes": sim.peak_allocated - paged_bytes,
            "segments": len(sim.segments)}
