"""A set of row keys for runs that remove millions of rows: whole-number keys in a sorted numpy array
(8 bytes a key, where a set of Python ints takes about 60), any other key (text, several columns)
in a set. Looked up a chunk of keys at a time."""

from __future__ import annotations

from array import array

import numpy as np


def _whole(key) -> bool:
    return type(key) is int and -2**63 <= key < 2**63


class RowKeys:
    def __init__(self):
        self._added = array("q")  # whole numbers added since the last lookup
        self._sorted = np.empty(0, dtype=np.int64)
        self._others: set = set()

    def add(self, key) -> None:
        if _whole(key):
            self._added.append(key)
        else:
            self._others.add(key)

    def contains(self, keys: list) -> list[bool]:
        """Per key, whether the set holds it."""
        if len(self._added):
            self._sorted = np.sort(np.concatenate([self._sorted, np.frombuffer(self._added, dtype=np.int64)]))
            self._added = array("q")
        held: set = set()
        wanted = np.array([k for k in keys if _whole(k)], dtype=np.int64)
        if len(wanted) and len(self._sorted):
            at = np.minimum(np.searchsorted(self._sorted, wanted), len(self._sorted) - 1)
            held = set(wanted[self._sorted[at] == wanted].tolist())
        return [k in held if _whole(k) else k in self._others for k in keys]
