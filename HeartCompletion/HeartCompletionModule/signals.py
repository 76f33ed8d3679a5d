"""A Qt-style signal in plain Python: how the logic reports events without importing Qt.

Custom ``qt.Signal`` objects are unreliable in PythonQt, and the logic must run without Qt at
all (tests drive it with ``slicer-core``), so the logic owns :class:`Signal` objects and the
widget connects its slots to them.

Usage::

    progress = Signal()
    connection = progress.connect(lambda fraction, message: print(fraction, message))
    progress.emit(0.5, "decoding")   # calls every connected slot, in connection order
    progress.disconnect(connection)
"""

from __future__ import annotations

import itertools
from typing import Callable


class Signal:
    """Slots called with the arguments of :meth:`emit`; a slot's exception propagates to the emitter."""

    def __init__(self) -> None:
        self._slots: dict[int, Callable] = {}
        self._ids = itertools.count()

    def connect(self, slot: Callable) -> int:
        """Call ``slot`` on every emit from now on; returns the id :meth:`disconnect` takes."""
        if not callable(slot):
            raise TypeError(f"a slot must be callable, got {slot!r}")
        connection = next(self._ids)
        self._slots[connection] = slot
        return connection

    def disconnect(self, connection: int) -> bool:
        """Forget one slot; False when it was not connected."""
        return self._slots.pop(connection, None) is not None

    def disconnectAll(self) -> None:
        self._slots.clear()

    def emit(self, *args) -> None:
        # a copy: a slot may connect or disconnect while we iterate
        for slot in list(self._slots.values()):
            slot(*args)
