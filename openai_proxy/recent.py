"""
:class:`RecentIds`: a set of identifiers that remembers only the newest ones.

A session sees item, response and call ids for as long as it lives (hours, thousands of turns); the
sets that guard against handling an id twice only ever need the recent ones, so they must not grow
with the conversation (SPEC §7: memory per session stays bounded).
"""

from __future__ import annotations


class RecentIds:
    """The ``limit`` ids added most recently (oldest forgotten first); ``in`` is O(1)."""

    __slots__ = ("_ids", "_limit")

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self._limit = limit
        self._ids: dict[str, None] = {}

    def add(self, item: str) -> None:
        self._ids.pop(item, None)
        self._ids[item] = None
        if len(self._ids) > self._limit:
            del self._ids[next(iter(self._ids))]

    def __contains__(self, item: object) -> bool:
        return item in self._ids

    def __len__(self) -> int:
        return len(self._ids)
