"""The compact set of row keys the anonymisation step checks references against."""

from __future__ import annotations

from retention.row_keys import RowKeys


def test_whole_numbers_text_and_compound_keys_are_found_and_only_them():
    keys = RowKeys()
    for key in (5, -3, 2**62, "C-001", (1, "a"), 7):
        keys.add(key)
    asked = [7, 6, -3, 2**62, 2**63, "C-001", "C-002", (1, "a"), (1, "b"), 5, 0]
    assert keys.contains(asked) == [True, False, True, True, False, True, False, True, False, True, False]
    keys.add(6)  # added after a lookup: found by the next one
    assert keys.contains([6, 8]) == [True, False]
    assert RowKeys().contains([1, "x"]) == [False, False]
