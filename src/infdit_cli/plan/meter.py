"""Measuring this process: seconds of device work (synchronised on CUDA) and host memory (Linux's
/proc/self/status), for `bench`, `selftest`, `calibrate` and `sdpa_pick`."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

__all__ = ["sync", "timed", "host_status", "rss", "reset_host_peak"]


def sync(device: torch.device) -> None:
    """Wait for the work queued on `device` (CUDA); nothing elsewhere (the CPU computes inline)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds for `fn()`, the device's queued work finished before and after."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def host_status(field: str = "VmRSS") -> int:
    """A /proc/self/status memory field in bytes (VmRSS: resident now; VmHWM: the peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field}")


def rss() -> int:
    """This process's resident bytes now."""
    return host_status("VmRSS")


def reset_host_peak() -> bool:
    """Give the heap's free memory back (glibc `malloc_trim`) and reset the peak RSS (`VmHWM`) to the
    RSS now; False where the kernel does not allow it (then the peak since the process began counts)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
