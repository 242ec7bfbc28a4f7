"""The names of a CPython process's threads, read out of its memory.

CPython before 3.14 does not give the name of a `threading.Thread` to the operating
system, so the name is only in the interpreter's objects. From the outside it is found by
following, for each interpreter:

    sys.modules (a dict in PyInterpreterState)
      -> ["threading"]  a module object; its md_dict is the module's globals
      -> ["_active"]    a dict: thread ident (int) -> Thread object
      -> each Thread's `_name` attribute, a str

The ident is what `threading.get_ident()` returns: the pthread_t that CPython also keeps
in `PyThreadState.thread_id`, so the result can be joined with the thread states.

Only memory is read (/proc/PID/mem through ProcessMemory): the process is not stopped,
so what is read may change underneath. Every loop is bounded and every size checked,
and anything that does not look right ends in UnreadableMemory.

The offsets come from the process's PythonLayout: `interp_modules` and `objects` (an
ObjectLayout). All numbers are for x86-64 Linux release builds with the GIL (the
free-threaded builds have no layout: layout_of refuses them).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Container, Dict, Iterator, Optional, Tuple

from bpfprof.symbolizer.process_memory import ProcessMemory, UnreadableMemory
from bpfprof.symbolizer.interpreters.python.layouts import (
    ABSENT,
    DICT_POINTER,
    INLINE_VALUES_AFTER_SLOTS,
    TAGGED_DICT_OR_VALUES,
    TYPE_BASICSIZE,
    VALUES_OR_DICT,
    PythonLayout,
)
from bpfprof.symbolizer.interpreters.python.objects import is_str, read_str
from bpfprof.symbolizer.interpreters.python.threads import interpreters

MAX_THREADS = 4096           # entries of threading._active looked at
MAX_DICT_ENTRIES = 1 << 16   # entries of any dict (sys.modules included) looked at
MAX_NAME_LENGTH = 256        # characters kept of a thread name (a longer one is cut)
MAX_WORK = 1 << 18           # dict entries looked at in all, so that garbage cannot keep us long

# Type flags (object.h).
MANAGED_DICT_FLAG = 1 << 4             # Py_TPFLAGS_MANAGED_DICT, 3.11+
INLINE_VALUES_FLAG = 1 << 2            # Py_TPFLAGS_INLINE_VALUES, 3.13+

# Values of PyDictKeysObject.dk_kind (3.11+, internal/pycore_dict.h).
DICT_KEYS_GENERAL = 0                  # entries are {hash, key, value}; otherwise {key, value}

_LONG_SHIFT = 30                 # PyLong_SHIFT (pyport.h picks 30 on 64-bit platforms)
_LONG_MAX_DIGITS = 3             # enough for any 64-bit pthread_t


@dataclass
class _Search:
    """How far one interpreter's sys.modules was searched for a module, or the global of
    that module looked for, once found (a module is never replaced in sys.modules, and the
    globals looked for are never rebound)."""
    keys: int = 0        # the dict's keys object searched; a resize makes a new one
    searched: int = 0    # its entries looked at: new ones are only ever appended after them
    found: int = 0       # the global
    found_type: int = 0  # and its type, to tell it is still there


@dataclass
class Searches:
    """What reads of one process's module globals found on the way, for the next read: a
    process that has started threads is read again and again while it starts up, and its
    sys.modules, searched afresh, cost most of each read (1-2 ms)."""
    # (sys.modules dict, module, global) -> search
    by_modules: Dict[Tuple[int, str, str], _Search] = field(default_factory=dict)


def thread_names(memory: ProcessMemory, layout: PythonLayout, runtime: int, searches: Optional[Searches] = None,
                 known: Container[int] = ()) -> Dict[int, str]:
    """{thread ident: name} of the `threading.Thread`s of every interpreter in a process
    (`runtime` is the address of its `_PyRuntime`, or 3.6's `interp_head`), but for the
    idents in `known`. The ident equals the thread state's `thread_id` (pthread_t). A
    process that has not imported threading has none: {}. Pass the same `searches` to
    every read of a process.

    Raises UnreadableMemory when the process is gone or its memory does not hold what it
    should, and ValueError for a CPython whose layout has no `objects`."""
    if layout.objects is None:
        raise ValueError(f"no object layout for CPython {layout.version[0]}.{layout.version[1]}")
    reader = ObjectReader(memory, layout, searches or Searches(), known)
    names: Dict[int, str] = {}
    # The main interpreter comes last in the list; let it have the last word.
    for interp in interpreters(memory, layout, runtime):
        names.update(reader.interpreter_thread_names(memory.pointer(interp + layout.interp_modules)))
    return names


class ObjectReader:
    """Reads module globals, dicts, ints and instance attributes of one process (str
    objects through objects.py), within MAX_WORK dict entries in all. `known`: thread
    idents whose names are not wanted."""

    def __init__(self, memory: ProcessMemory, layout: PythonLayout, searches: Searches,
                 known: Container[int] = ()) -> None:
        self.memory = memory
        self.layout = layout
        self.o = layout.objects  # there: thread_names checked
        self.searches = searches
        self.known = known
        self.dict_type = 0  # the address of PyDict_Type, learnt from sys.modules
        self.work_left = MAX_WORK

    def interpreter_thread_names(self, modules: int) -> Dict[int, str]:
        if not modules:
            return {}  # an interpreter being created or torn down
        active = self.module_global(modules, "threading", "_active")
        if active is None:
            return {}
        names: Dict[int, str] = {}
        for _, key, thread in self.dict_items(active, MAX_THREADS):
            try:
                ident = self.read_ident(key)
                if ident is None or ident in self.known:
                    continue
                name_address = self.attribute(thread, "_name")
                if name_address is not None:
                    names[ident] = read_str(self.memory, self.layout, name_address, MAX_NAME_LENGTH)
            except UnreadableMemory:
                continue  # a thread ending while we look: skip it
        return names

    def module_global(self, modules: int, module: str, name: str) -> Optional[int]:
        """The global `name` of the module `module` in the interpreter whose sys.modules
        is at `modules`, or None; the search looks only at the entries added since the last."""
        self.dict_type = self.type_of(modules)  # sys.modules is a dict
        search = self.searches.by_modules.setdefault((modules, module, name), _Search())
        if search.found and self.type_of(search.found) == search.found_type:
            return search.found
        keys = self.memory.pointer(modules + self.o.dict_keys)
        if keys != search.keys:
            search.keys, search.searched = keys, 0
        for index, key, value in self.dict_items(modules, first=search.searched):
            if is_str(self.memory, self.layout, key, module):
                # The module is in sys.modules before its body has run: until the global
                # is made, the search stays at this entry.
                found = self.dict_get(self.memory.pointer(value + self.o.module_dict), name)
                if found:
                    search.found, search.found_type = found, self.type_of(found)
                return found
            search.searched = index + 1
        return None

    # --- objects --------------------------------------------------------------------

    def type_of(self, address: int) -> int:
        return self.memory.pointer(address + self.o.object_type)

    def read_ident(self, address: int) -> Optional[int]:
        """The value of an int object, or None if it cannot be a thread ident."""
        tag = self.memory.s64(address + self.o.long_size)
        if self.o.long_tagged:
            digits, sign = tag >> 3, tag & 3
            negative = sign == 2
        else:
            digits, negative = abs(tag), tag < 0
        if negative or not 0 <= digits <= _LONG_MAX_DIGITS:
            return None
        data = self.memory.read(address + self.o.long_digits, 4 * digits)
        value = 0
        for i, digit in enumerate(struct.unpack(f"<{digits}I", data)):
            value |= (digit & ((1 << _LONG_SHIFT) - 1)) << (_LONG_SHIFT * i)
        return value

    # --- dicts ----------------------------------------------------------------------

    def keys_entries(self, keys: int, limit: int, first: int = 0) -> Iterator[Tuple[int, int, int]]:
        """(index, key, value) of each used entry among the first `limit` entries of a
        PyDictKeysObject, from entry `first` on; value is the entry's own (meaningless in
        a split table, whose values live elsewhere)."""
        o = self.o
        head = self.memory.read(keys, o.keys_indices)
        nentries = struct.unpack_from("<q", head, o.keys_nentries)[0]
        if o.keys_kind == ABSENT:
            # <= 3.10: dk_size slots of 1, 2, 4 or 8 bytes each, by dk_size.
            size = struct.unpack_from("<q", head, o.keys_size)[0]
            if size < 1 or size & (size - 1) or size > 1 << 31:   # the shared empty keys have 1
                raise UnreadableMemory(f"not dict keys at {keys:#x} (dk_size {size})")
            index_bytes = 1 if size <= 0xFF else 2 if size <= 0xFFFF else 4
            table_bytes, general = size * index_bytes, True
        else:
            log2_size, log2_index_bytes, kind = head[o.keys_size], head[o.keys_log2_index_bytes], head[o.keys_kind]
            # (The shared empty keys have log2 sizes of 0.)
            if log2_size > 32 or not log2_size <= log2_index_bytes <= log2_size + 3 or kind > 2:
                raise UnreadableMemory(f"not dict keys at {keys:#x}")
            table_bytes, general = 1 << log2_index_bytes, kind == DICT_KEYS_GENERAL
        if not 0 <= nentries <= MAX_DICT_ENTRIES:
            raise UnreadableMemory(f"dict keys at {keys:#x} claim {nentries} entries")
        nentries = min(nentries, limit)
        first = min(first, nentries)
        self.work_left -= nentries - first
        if self.work_left < 0:
            raise UnreadableMemory(f"more than {MAX_WORK} dict entries to look at: not a sane process")
        entry_size = 24 if general else 16      # {hash, key, value} or {key, value}
        key_at = 8 if general else 0
        data = self.memory.read(keys + o.keys_indices + table_bytes + first * entry_size,
                                (nentries - first) * entry_size)
        for index in range(first, nentries):
            key, value = struct.unpack_from("<QQ", data, (index - first) * entry_size + key_at)
            if key:  # a deleted entry has none
                yield index, key, value

    def dict_items(self, address: int, limit: int = MAX_DICT_ENTRIES, first: int = 0) -> Iterator[Tuple[int, int, int]]:
        """(index, key, value) of each item of a dict object (among its first `limit`,
        from entry `first` on)."""
        if not address or self.type_of(address) != self.dict_type:
            raise UnreadableMemory(f"not a dict at {address:#x}")
        keys = self.memory.pointer(address + self.o.dict_keys)
        values = self.memory.pointer(address + self.o.dict_values)
        for index, key, value in self.keys_entries(keys, limit, first):
            if values:  # a split table: the values are in their own array
                value = self.memory.pointer(values + self.o.values_items + 8 * index)
            if value:
                yield index, key, value

    def dict_get(self, address: int, name: str) -> Optional[int]:
        """The value under a str key in a dict object, or None."""
        for _, key, value in self.dict_items(address):
            if is_str(self.memory, self.layout, key, name):
                return value
        return None

    # --- instance attributes --------------------------------------------------------

    def attribute(self, obj: int, name: str) -> Optional[int]:
        """An attribute kept in an instance's __dict__ (or the values that stand in for
        it), or None."""
        o, memory = self.o, self.memory
        tp = self.type_of(obj)
        flags = memory.pointer(tp + o.type_flags)
        if o.instance_dict == DICT_POINTER or not flags & MANAGED_DICT_FLAG:
            dictoffset = memory.s64(tp + o.type_dictoffset)
            if not 0 < dictoffset < 1 << 16:
                return None  # no __dict__ (or one of a variable-size object: not a Thread)
            return self.dict_get_or_none(memory.pointer(obj + dictoffset), name)
        if o.instance_dict == VALUES_OR_DICT:
            values = memory.pointer(obj + o.managed_values)
            if values:
                return self.values_get(tp, values, name)
            return self.dict_get_or_none(memory.pointer(obj + o.managed_dict), name)
        if o.instance_dict == TAGGED_DICT_OR_VALUES:
            dict_or_values = memory.pointer(obj + o.managed_dict)
            if dict_or_values & 1:
                return self.values_get(tp, dict_or_values + 1, name)
            return self.dict_get_or_none(dict_or_values, name)
        # INLINE_VALUES: once a dict exists it is the truth (its values may still be the
        # inline ones); before, the inline values are, if the type has them.
        managed = memory.pointer(obj + o.managed_dict)
        if managed:
            return self.dict_get(managed, name)
        if flags & INLINE_VALUES_FLAG:
            at = memory.s64(tp + TYPE_BASICSIZE) if o.instance_dict == INLINE_VALUES_AFTER_SLOTS else o.managed_values
            if not 0 < at < 1 << 16:
                return None
            values = obj + at
            if memory.read(values + o.values_valid, 1)[0]:
                return self.values_get(tp, values, name)
        return None

    def dict_get_or_none(self, address: int, name: str) -> Optional[int]:
        return self.dict_get(address, name) if address else None

    def values_get(self, tp: int, values: int, name: str) -> Optional[int]:
        """An attribute from a values array, whose keys are the type's shared keys."""
        keys = self.memory.pointer(tp + self.o.heaptype_cached_keys)
        if not keys:
            raise UnreadableMemory(f"values at {values:#x} but no shared keys in type {tp:#x}")
        for index, key, _ in self.keys_entries(keys, MAX_DICT_ENTRIES):
            if is_str(self.memory, self.layout, key, name):
                if self.o.values_capacity != ABSENT and index >= self.memory.read(values + self.o.values_capacity, 1)[0]:
                    return None
                return self.memory.pointer(values + self.o.values_items + 8 * index) or None
        return None
