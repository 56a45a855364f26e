"""Peak extra memory of a region, the one measure every benchmark script reports.

    with PeakMemory(device) as mem:
        loss = f(z); loss.backward()
    mem.extra   # bytes above the level at the start of the region

CUDA: the caching allocator's statistics (``max_memory_allocated`` after a reset), exact.

CPU: PyTorch keeps no allocation statistics, so two measures are taken and the larger is
reported; each covers the other's blind spot:
- the bytes glibc's malloc has handed out and not freed (``mallinfo2``: heap blocks plus
  mmapped blocks, every arena), sampled by a thread every ``interval`` seconds. It counts
  memory malloc reuses from earlier frees, but misses a peak shorter than the interval;
- the kernel's resident-set high-water mark (``VmHWM``, reset at the start through
  ``/proc/self/clear_refs``, after ``malloc_trim(0)`` has handed the pages malloc kept
  back to the kernel). It sees every new page however briefly it lived (an N×N buffer
  freed within a millisecond included); without the trim, a buffer placed in pages an
  earlier free left resident would raise no mark.
Neither changes malloc's thresholds, which would distort the timings. Where glibc or the
reset is missing the other measure stands alone; with neither, the resident set is
sampled.

Regions may nest, or overlap from several threads: both marks are process-wide, so a
region starting inside another first folds the mark so far into every open region, then
resets it.
"""
from __future__ import annotations

import ctypes
import os
import re
import threading

import torch


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _libc_function(name: str, restype=None, argtypes=None):
    """A glibc function through ctypes, or None where there is no glibc or no such function."""
    try:
        fn = getattr(ctypes.CDLL("libc.so.6"), name)
    except (OSError, AttributeError):
        return None
    if restype is not None:
        fn.restype = restype
    if argtypes is not None:
        fn.argtypes = argtypes
    return fn


def _heap_reader():
    """A function giving the bytes malloc has in use (glibc's mallinfo2), or None."""
    fn = _libc_function("mallinfo2", restype=_MallInfo2)
    if fn is None:
        return None

    def read() -> int:
        info = fn()
        return int(info.uordblks + info.hblkhd)

    return read


_HEAP_BYTES = _heap_reader()


def heap_bytes() -> int:
    """Bytes in use by malloc (mallinfo2) where glibc has it, else the resident set."""
    if _HEAP_BYTES is not None:
        return _HEAP_BYTES()
    return resident_bytes()


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            hit = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(hit.group(1)) if hit else None


_MALLOC_TRIM = _libc_function("malloc_trim", argtypes=[ctypes.c_size_t])


def reset_resident_peak() -> bool:
    """Hand malloc's free pages back to the kernel (glibc), then reset the process's
    resident-set high-water mark (Linux ≥ 4.0). False where the mark cannot be reset, or
    the reset was accepted but ignored (the mark still well above the resident set)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    hwm, rss = _status_kb("VmHWM"), _status_kb("VmRSS")
    return hwm is not None and rss is not None and hwm <= rss + 4096


_OPEN: list["PeakMemory"] = []  # regions entered and not yet left, in any thread
_OPEN_LOCK = threading.Lock()


class PeakMemory:
    """Peak bytes above the level at entry of the region it wraps (see the module's
    docstring for how each device measures it). ``extra`` in bytes, ``extra_mb`` in MiB."""

    def __init__(self, device, interval: float = 0.0005):
        self.device = torch.device(device) if not isinstance(device, torch.device) else device
        self.interval = interval
        self.extra = 0

    @property
    def extra_mb(self) -> float:
        return self.extra / 2**20

    def _mark(self) -> int:
        """The process-wide high-water mark this region reads (bytes, absolute): CUDA's
        max_memory_allocated, or VmHWM on the CPU (0 where it cannot be reset)."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return _status_kb("VmHWM") * 1024 if self._hwm else 0

    def __enter__(self):
        with _OPEN_LOCK:
            for region in _OPEN:  # the reset below wipes their mark: keep what it read so far
                if region.device == self.device:
                    region._folded = max(region._folded, region._mark())
            self._folded = 0
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
                self._base = torch.cuda.memory_allocated(self.device)
                _OPEN.append(self)
                return self
            self._hwm = reset_resident_peak()
            self._hwm_base = resident_bytes() if self._hwm else 0
            _OPEN.append(self)
        self._base = self._peak = heap_bytes()
        self._stop = threading.Event()
        started = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(started,), daemon=True)
        self._thread.start()
        started.wait()  # the region starts after the sampler's first read
        return self

    def _sample(self, started):
        self._peak = max(self._peak, heap_bytes())
        started.set()
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, heap_bytes())

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        with _OPEN_LOCK:
            _OPEN.remove(self)
            mark = max(self._folded, self._mark())
        if self.device.type == "cuda":
            self.extra = max(0, mark - self._base)
            return
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, heap_bytes())
        extra = self._peak - self._base
        if self._hwm:
            extra = max(extra, mark - self._hwm_base)
        self.extra = max(0, extra)


def describe(device) -> str:
    """One line for a results table: how its peak column is measured on this machine."""
    if torch.device(device).type == "cuda":
        return "CUDA max_memory_allocated above the level before"
    sampled = ("malloc's bytes in use (mallinfo2, " if _HEAP_BYTES is not None else "the resident set (") + \
        "sampled every 0.5 ms)"
    if not reset_resident_peak():
        return sampled + " above the level before (no resettable VmHWM here)"
    return (f"the larger of {sampled} and the resident-set high-water mark (VmHWM, after malloc_trim), "
            "each above the level before")
