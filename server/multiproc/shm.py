"""Moving sub-batches between a frontend process and the engine process.

Rows travel through shared memory: each side owns one growable segment per in-flight slot
(a file in /dev/shm, mapped by both), writes its arrays into it once, and tells the other
side where they are in a small header sent over a local socket. The reader maps the same
pages, so an array crosses the process boundary with one copy (into the segment). A side
never writes a slot's segment while the other may still read it: a frontend reuses a slot
only once its answer has been read, and the engine answers a slot's sub-batch once.

Knows numpy and the standard library only.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SHM_DIR = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
_ALIGN = 64


@dataclass(frozen=True, slots=True)
class ArrayRef:
    """Where one array lies in a segment: enough for the other side to view it."""

    offset: int
    shape: tuple[int, ...]
    dtype: str


class Segment:
    """A shared-memory file this process writes (and grows) and the other side maps."""

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix
        self._generation = 0
        self.path: Path | None = None
        self._map: mmap.mmap | None = None

    def write(self, arrays: list[np.ndarray | None]) -> tuple[str, list[ArrayRef | None]]:
        """Copy `arrays` into the segment (growing it if needed); return its path and where
        each array lies (None stays None)."""
        refs, offset = [], 0
        for a in arrays:
            if a is None:
                refs.append(None)
                continue
            refs.append(ArrayRef(offset, tuple(a.shape), a.dtype.str))
            offset += _aligned(a.nbytes)
        self._reserve(offset)
        for a, ref in zip(arrays, refs, strict=True):
            if a is not None:
                view = np.ndarray(ref.shape, np.dtype(ref.dtype), self._map, ref.offset)
                view[...] = a
        return str(self.path), refs

    def _reserve(self, size: int) -> None:
        if self._map is not None and len(self._map) >= max(size, 1):
            return
        self.close()
        self._generation += 1
        self.path = SHM_DIR / f"{self._prefix}-{self._generation}"
        capacity = max(1 << 20, 1 << (max(size, 1) - 1).bit_length())
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, capacity)
            self._map = mmap.mmap(fd, capacity)
        finally:
            os.close(fd)

    def close(self) -> None:
        """Unmap and remove the file (the other side's mapping stays valid until it unmaps)."""
        if self._map is not None:
            self._map.close()
            self._map = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)


class Mapped:
    """The other side's segment, mapped read-only by path (re-mapped when it grows)."""

    def __init__(self) -> None:
        self._path: str | None = None
        self._map: mmap.mmap | None = None

    def view(self, path: str, ref: ArrayRef | None) -> np.ndarray | None:
        """A read-only array over the other side's segment (valid until its next write)."""
        if ref is None:
            return None
        if path != self._path:
            if Path(path).resolve().parent != SHM_DIR.resolve():
                raise ValueError(f"{path!r} is not a shared-memory segment (not in {SHM_DIR})")
            self.close()
            with open(path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._path = path
        return np.ndarray(ref.shape, np.dtype(ref.dtype), self._map, ref.offset)

    def close(self) -> None:
        if self._map is not None:
            with contextlib.suppress(BufferError):  # still viewed: the collector closes it
                self._map.close()
            self._map = None
        self._path = None


def remove_leftovers(prefix: str) -> int:
    """Remove segments a killed process left behind (their names start with `prefix`)."""
    removed = 0
    for path in SHM_DIR.glob(f"{prefix}*"):
        path.unlink(missing_ok=True)
        removed += 1
    return removed


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN
