"""Large freed blocks go back to the operating system at once, in every serving process.

glibc serves a block of its mmap threshold or more with a mapping of its own, unmapped when
freed; but the threshold starts at 128 KiB and rises to the size of each such block freed
(up to 32 MiB), after which 15 MB messages and answers come from the heap's arenas, which
keep freed memory (one arena per thread that allocates). Under the bench flood the
frontends then held some 400 MB each above what the memory bound counted. A fixed
threshold of LARGE_BYTES makes every block that large (a message or answer of a few hundred
64x64x3 rows) a mapping of its own again, so resident memory follows what requests hold.
Smaller blocks, an engine batch's tensors among them, stay on the heap, whose free top is
kept up to TRIM_BYTES: at 1 MiB, or at glibc's 128 KiB trim once the threshold is fixed,
every batch faulted its memory in afresh and the flood's rows/s fell to about a half and a
third (tuning log 72). Elsewhere than glibc this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util

LARGE_BYTES = 8 << 20
TRIM_BYTES = 32 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (glibc's malloc.h)


def return_large_blocks() -> bool:
    """Have blocks of LARGE_BYTES or more mapped on their own (given back when freed) and
    the heap's top trimmed past TRIM_BYTES; False where the C library is not glibc or
    refused."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(
        mallopt(_M_MMAP_THRESHOLD, LARGE_BYTES) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_BYTES) == 1
    )
