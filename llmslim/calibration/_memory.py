"""Peak memory of a stretch of work: resident set size (sampled) and CUDA allocations."""

from __future__ import annotations

import os
import resource
import threading
import time
from types import TracebackType

import torch

__all__ = ["rss_bytes", "PeakMemory", "return_free_memory"]

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


_TRIM: list = []  # glibc's malloc_trim, looked up once ([None] where there is none)


def return_free_memory() -> None:
    """Hand freed heap pages back to the operating system (glibc ``malloc_trim``; else nothing).

    glibc keeps freed memory below its mmap threshold (which rises to 32 MiB as large blocks
    are freed) mapped for reuse; after a block's activations and statistics are freed, the next
    block's allocations fit those holes badly and resident memory creeps up block by block.
    The calibration engine calls this after each block.
    """
    if not _TRIM:
        try:
            import ctypes

            _TRIM.append(ctypes.CDLL("libc.so.6").malloc_trim)
        except (OSError, AttributeError):  # not glibc
            _TRIM.append(None)
    if _TRIM[0] is not None:
        _TRIM[0](0)


def rss_bytes() -> int:
    """Current resident set size of this process (Linux: /proc/self/statm; else the peak so far)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except OSError:  # not Linux: ru_maxrss is the best there is (KiB on Linux, bytes on macOS)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Context manager measuring the peak RSS growth above its start, and peak CUDA memory.

    RSS is sampled by a background thread every ``interval`` seconds (a peak shorter than that
    can be missed; ``interval=0.01`` here costs nothing measurable).

    Example:
        >>> with PeakMemory() as peak:
        ...     block = bytearray(50_000_000)
        >>> peak.rss_growth >= 0
        True
    """

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.start = 0
        self.peak = 0
        self.cuda_peak: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> PeakMemory:
        self.start = self.peak = rss_bytes()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        if torch.cuda.is_available():
            self.cuda_peak = torch.cuda.max_memory_allocated()

    @property
    def rss_growth(self) -> int:
        """Peak RSS minus RSS at the start, in bytes."""
        return max(0, self.peak - self.start)
