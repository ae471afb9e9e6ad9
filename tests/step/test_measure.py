"""peftkit.step.measure: the process's current RSS and its peak sampler, on and off Linux."""

import resource
import sys
import time
from types import SimpleNamespace

import psutil

from peftkit.step import measure


def test_rss_off_linux_is_the_current_rss_not_the_peak(monkeypatch):
    """No /proc (macOS), and a high-water mark far above what the process holds now: the
    current RSS is what is there now, not ru_maxrss (bytes on macOS, never x1024)."""

    def no_proc(path, *a, **k):
        if str(path).startswith("/proc"):
            raise FileNotFoundError(path)
        return open(path, *a, **k)

    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(measure, "open", no_proc, raising=False)
    peak = 64 * 2**30  # a 64 GiB high-water mark, in bytes as macOS reports ru_maxrss
    monkeypatch.setattr(resource, "getrusage", lambda who: SimpleNamespace(ru_maxrss=peak))
    now = psutil.Process().memory_info().rss
    got = measure.rss_bytes()
    assert abs(got - now) < 256 * 2**20, (got, now)


def test_peak_sampler_sees_an_allocation():
    with measure.PeakRSS(interval=0.001) as rss:
        block = bytearray(96 * 2**20)  # touched pages: resident
        block[::4096] = b"x" * len(block[::4096])
        time.sleep(0.05)  # several samples while it is held
        del block
    assert rss.peak - rss.baseline >= 64 * 2**20
