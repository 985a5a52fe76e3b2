"""Host memory for CPU training: let glibc's malloc keep freed blocks for reuse.

By default glibc serves blocks of 128 KiB and more (an activation, a gradient, a batch) with a
fresh `mmap`, or returns the free top of its heap to the system, and raises those thresholds on
its own as it goes. A training step frees and allocates the same sizes again and again, so each
step can fault the same memory back in page by page: hundreds of page faults per step for a
256 x 1024 MLP, ~1 ms of a 10 ms step here, and more or fewer from one run to the next. Fixed,
high thresholds keep the memory in the process, where the next step reuses it. The cost is that
memory freed after a peak stays with the process until it ends.

This is `mallopt(3)`, the same as setting `MALLOC_MMAP_THRESHOLD_` and `MALLOC_TRIM_THRESHOLD_`
before start; it does nothing where the C library is not glibc.
"""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest allowed value (64-bit): bigger blocks still mmap
TRIM_THRESHOLD = 2**30  # give free heap memory back only above 1 GiB


def keep_freed_memory() -> bool:
    """Set the thresholds for this whole process; True if the C library took them."""
    try:
        # The running process's own symbols, the C library's among them: no search for the
        # library file (`ctypes.util.find_library` runs ldconfig or a compiler to find it).
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False  # no mallopt (macOS, Windows): nothing to set
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
