"""A map that keeps its entries in the order they were last used and adds up what they
cost (their bytes, say), so that its owner can drop the least recently used first to stay
within a bound. Entries belong to groups (a process) that are dropped at once. Not
locked: an owner used from several threads holds a lock around each call."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Dict, Generic, Hashable, Set, Tuple, TypeVar

K = TypeVar("K", bound=Hashable)
_ABSENT = object()
V = TypeVar("V")


class LruCache(Generic[K, V]):
    def __init__(self, cost: Callable[[V], int], on_drop: Callable[[V], None] = lambda value: None) -> None:
        self._cost = cost  # of one entry's value, counted while the entry is held
        self._on_drop = on_drop  # told of each value that leaves (replaced, dropped or forgotten)
        self._entries: OrderedDict[Tuple[Hashable, K], V] = OrderedDict()
        self._groups: Dict[Hashable, Set[K]] = {}
        self.total_cost = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, group: Hashable, key: K, default: Any = None) -> Any:
        """The value, now the most recently used; default when absent."""
        entry = (group, key)
        value = self._entries.get(entry, _ABSENT)
        if value is _ABSENT:
            return default
        self._entries.move_to_end(entry)
        return value

    def put(self, group: Hashable, key: K, value: V) -> None:
        entry = (group, key)
        if entry in self._entries:
            self._drop(entry)
        self._entries[entry] = value
        self._groups.setdefault(group, set()).add(key)
        self.total_cost += self._cost(value)

    def drop_oldest(self) -> None:
        """Drop the least recently used entry."""
        if self._entries:
            self._drop(next(iter(self._entries)))

    def forget(self, group: Hashable) -> None:
        """Drop every entry of the group."""
        for key in list(self._groups.get(group, ())):
            self._drop((group, key))

    def _drop(self, entry: Tuple[Hashable, K]) -> None:
        value = self._entries.pop(entry)
        group, key = entry
        keys = self._groups[group]
        keys.discard(key)
        if not keys:
            del self._groups[group]
        self.total_cost -= self._cost(value)
        self._on_drop(value)
