"""The memory budget's count shared by the frontends of a multi-process server: one slot
per process in shared memory, their sum the bytes the whole server holds (core/budget.py
checks and changes it under the array's lock). Each process adds to its own slot only, so
when one dies the supervisor zeroes its slot, and the bytes it held are not counted for
ever."""

from __future__ import annotations

import contextlib
from multiprocessing.sharedctypes import SynchronizedArray


class SharedCount:
    """Process `slot`'s view of the shared count (picklable to a spawned process)."""

    def __init__(self, slots: SynchronizedArray, slot: int) -> None:
        self._slots, self.slot = slots, slot

    def get_lock(self) -> contextlib.AbstractContextManager:
        return self._slots.get_lock()

    def add(self, nbytes: int) -> None:
        self._slots.get_obj()[self.slot] += nbytes

    def total(self) -> int:
        return sum(self._slots.get_obj())

    def own(self) -> int:
        return self._slots.get_obj()[self.slot]

    def clear(self) -> None:
        """Its process is gone: whatever it held is free."""
        with self._slots.get_lock():
            self._slots.get_obj()[self.slot] = 0
