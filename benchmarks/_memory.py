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
  ``/proc/self/clear_refs``). It sees every new page however briefly it lived (an N×N
  buffer freed within a millisecond included), but not memory malloc reuses without
  touching new pages.
Neither changes malloc's thresholds, which would distort the timings. Where glibc or the
reset is missing the other measure stands alone; with neither, the resident set is
sampled.
"""
from __future__ import annotations

import ctypes
import os
import re
import threading
import time

import torch


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _heap_reader():
    """A function giving the bytes malloc has in use (glibc's mallinfo2), or None."""
    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2

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


def reset_resident_peak() -> bool:
    """Reset the process's resident-set high-water mark (Linux ≥ 4.0); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_kb("VmHWM") is not None


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

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        self._hwm = reset_resident_peak()
        self._hwm_base = resident_bytes() if self._hwm else 0
        self._base = self._peak = heap_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, heap_bytes())
            self._stop.wait(self.interval)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.extra = max(0, torch.cuda.max_memory_allocated(self.device) - self._base)
            return
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, heap_bytes())
        extra = self._peak - self._base
        if self._hwm:
            extra = max(extra, _status_kb("VmHWM") * 1024 - self._hwm_base)
        self.extra = max(0, extra)


def describe(device) -> str:
    """One line for a results table: how its peak column was measured."""
    if torch.device(device).type == "cuda":
        return "CUDA max_memory_allocated above the level before"
    return ("the larger of malloc's bytes in use (mallinfo2, sampled every 0.5 ms) and the resident-set "
            "high-water mark (VmHWM), each above the level before")
