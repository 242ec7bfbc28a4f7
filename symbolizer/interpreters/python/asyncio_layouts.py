"""Where asyncio keeps its tasks inside a running CPython, for reading them from another
process (asyncio_tasks.py).

3.11 to 3.13 are tabled here (ASYNCIO_LAYOUTS); 3.14 and later publish the offsets
(asyncio_layout_from_debug_offsets), but for two facts of their coroutines kept here.

The tasks of 3.11 to 3.13 are found through a module global of `asyncio.tasks`: a WeakSet
(`_all_tasks` in 3.11, `_scheduled_tasks` from 3.12 on) whose `data` attribute is a set of
weak references to the tasks. A task is a TaskObj of the C module _asyncio
(Modules/_asynciomodule.c, not an installed header: its offsets are checked against live
interpreters by tests/unit/test_asyncio_tasks.py); its coroutine is a PyGenObject
(cpython/genobject.h) with its _PyInterpreterFrame inline (internal/pycore_frame.h); a
coroutine suspended in an `await` keeps what it awaits on the top of its value stack.

3.14 keeps each thread's tasks in a circular list that starts in the thread's state
(_PyThreadStateImpl, internal/pycore_tstate.h) and runs through a node inside each task
(TaskObj.task_node). The _asyncio module publishes where, for out-of-process tools, in
_Py_AsyncioModuleDebugOffsets (Modules/_asynciomodule.c), a section of its own
(.AsyncioDebug) of the binary it is built into: a shared module in 3.14
(lib-dynload/_asyncio.*.so, mapped when asyncio is first imported), the interpreter in
3.15. The coroutines' offsets come from _Py_DebugOffsets (its gen_object group). The
values of a coroutine's frame state and where an await keeps what it awaits are
published nowhere: COROUTINE_FACTS has them for each minor version, and a version
without them is not read.

All numbers are for x86-64 Linux release builds with the GIL.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Dict, FrozenSet, Optional, Tuple

from bpfprof.symbolizer.errors import MalformedInput
from bpfprof.symbolizer.interpreters.python.layouts import ABSENT, debug_offsets_members, offset_problem


@dataclass(frozen=True)
class AsyncioLayout:
    """Byte offsets of the objects asyncio's tasks are made of, for one minor version."""

    tasks_global: str                # the WeakSet of asyncio.tasks that holds every task
    type_name: int                   # offsetof(PyTypeObject, tp_name), a char *
    set_mask: int                    # offsetof(PySetObject, mask)
    set_table: int                   # offsetof(PySetObject, table): setentry {key, hash}
    weakref_object: int              # offsetof(PyWeakReference, wr_object)
    task_loop: int                   # TaskObj.task_loop: the event loop it runs on (<= 3.13)
    task_coro: int                   # TaskObj.task_coro
    task_name: int                   # TaskObj.task_name: a str, or (3.12+) an int N for "Task-N"
    gen_frame_state: int             # offsetof(PyGenObject, gi_frame_state), an int8_t
    gen_iframe: int                  # offsetof(PyGenObject, gi_iframe): the frame, inline
    frame_stacktop: int              # offsetof(_PyInterpreterFrame, stacktop), an int: TOS index + 1 (<= 3.13)
    frame_localsplus: int            # offsetof(_PyInterpreterFrame, localsplus)
    suspended_in_await: FrozenSet[int]  # gi_frame_state values of a coroutine suspended in an await
    awaited_slot: int = 1            # what an await awaits is this many entries down from its value stack's end
    # 3.14+, ABSENT before:
    frame_stackpointer: int = ABSENT  # offsetof(_PyInterpreterFrame, stackpointer): past the stack's last entry
    task_node: int = ABSENT           # TaskObj.task_node, its node in its thread's list
    tstate_running_loop: int = ABSENT  # _PyThreadStateImpl.asyncio_running_loop (NULL: none runs)
    tstate_tasks_head: int = ABSENT   # _PyThreadStateImpl.asyncio_tasks_head, the list's head node
    llist_next: int = ABSENT          # offsetof(struct llist_node, next)


# (3.11, 3.12) enum _framestate: FRAME_SUSPENDED = -1, for a plain yield and an await
# alike; a coroutine (of `async def`) only suspends in an await. 3.13 tells them apart:
# FRAME_SUSPENDED_YIELD_FROM = -1, FRAME_SUSPENDED = -2.
_SUSPENDED_IN_AWAIT = frozenset({-1})

ASYNCIO_LAYOUTS: Dict[Tuple[int, int], AsyncioLayout] = {
    # 3.11: PyGenObject still opens with gi_code, so its frame comes one pointer later.
    (3, 11): AsyncioLayout(
        tasks_global="_all_tasks", type_name=24, set_mask=32, set_table=40, weakref_object=16,
        task_loop=16, task_coro=136, task_name=144,
        gen_frame_state=75, gen_iframe=80, frame_stacktop=64, frame_localsplus=72,
        suspended_in_await=_SUSPENDED_IN_AWAIT,
    ),
    (3, 12): AsyncioLayout(
        tasks_global="_scheduled_tasks", type_name=24, set_mask=32, set_table=40, weakref_object=16,
        task_loop=16, task_coro=136, task_name=144,
        gen_frame_state=67, gen_iframe=72, frame_stacktop=64, frame_localsplus=72,
        suspended_in_await=_SUSPENDED_IN_AWAIT,
    ),
    # 3.13: FutureObj is two pointers shorter, so TaskObj's own members come earlier.
    (3, 13): AsyncioLayout(
        tasks_global="_scheduled_tasks", type_name=24, set_mask=32, set_table=40, weakref_object=16,
        task_loop=16, task_coro=120, task_name=128,
        gen_frame_state=67, gen_iframe=72, frame_stacktop=64, frame_localsplus=72,
        suspended_in_await=_SUSPENDED_IN_AWAIT,
    ),
}


def asyncio_layout_for(version: Tuple[int, int]) -> Optional[AsyncioLayout]:
    """The tabled asyncio layout of a CPython (major, minor) up to 3.13, or None."""
    return ASYNCIO_LAYOUTS.get(tuple(version))


# The section of the binary that holds _Py_AsyncioModuleDebugOffsets.
ASYNCIO_DEBUG_SECTION = b".AsyncioDebug"
# Its members, uint64_t each, in groups that each open with the size of their structure;
# the same in 3.14.10 and 3.15.2.
_ASYNCIO_DEBUG_OFFSETS = (
    ("asyncio_task_object", ("size", "task_name", "task_awaited_by", "task_is_task", "task_awaited_by_is_set",
                             "task_coro", "task_node")),
    ("asyncio_interpreter_state", ("size", "asyncio_tasks_head")),
    ("asyncio_thread_state", ("size", "asyncio_running_loop", "asyncio_running_task", "asyncio_tasks_head")),
)
ASYNCIO_DEBUG_OFFSETS_SIZE = 8 * sum(len(members) for _, members in _ASYNCIO_DEBUG_OFFSETS)
_MAX_TASK_SIZE = 1 << 12  # bytes of a TaskObj at most: what is read of one stays within them

# What asyncio_layout_from_debug_offsets reads of _Py_DebugOffsets: field -> member.
_FROM_DEBUG_OFFSETS = {
    "type_name": "type_object.tp_name",
    "gen_iframe": "gen_object.gi_iframe",
    "gen_frame_state": "gen_object.gi_frame_state",
    "frame_stackpointer": "interpreter_frame.stackpointer",
    "frame_localsplus": "interpreter_frame.localsplus",
    "llist_next": "llist_node.next",
}
# And of _Py_AsyncioModuleDebugOffsets.
_FROM_ASYNCIO_DEBUG_OFFSETS = {
    "task_name": "asyncio_task_object.task_name",
    "task_coro": "asyncio_task_object.task_coro",
    "task_node": "asyncio_task_object.task_node",
    "tstate_running_loop": "asyncio_thread_state.asyncio_running_loop",
    "tstate_tasks_head": "asyncio_thread_state.asyncio_tasks_head",
}


@dataclass(frozen=True)
class CoroutineFacts:
    """What a minor version's coroutines do that no debug offsets publish
    (internal/pycore_frame.h: enum _framestate; the instructions of an await)."""
    suspended_in_await: FrozenSet[int]  # gi_frame_state values: FRAME_SUSPENDED_YIELD_FROM (and _LOCKED)
    awaited_slot: int  # entries down from the value stack's end where the awaited object is


COROUTINE_FACTS: Dict[Tuple[int, int], CoroutineFacts] = {
    # The awaited object is the stack's last entry.
    (3, 14): CoroutineFacts(frozenset({-1}), 1),
    # The states count up from FRAME_CREATED = 0 (FRAME_SUSPENDED_YIELD_FROM 2, its _LOCKED
    # variant 3), and a NULL follows the awaited object on the stack.
    (3, 15): CoroutineFacts(frozenset({2, 3}), 2),
}


def asyncio_layout_from_debug_offsets(debug_offsets: bytes, asyncio_debug_offsets: bytes) -> AsyncioLayout:
    """The asyncio layout of a 3.14+ CPython from the start of its _PyRuntime (as for
    parse_debug_offsets) and the bytes of its .AsyncioDebug section. Every offset read is
    checked to lie inside its structure and to be aligned. Raises MalformedInput naming
    each offset that fails, or what is not known of the version."""
    version, members = debug_offsets_members(debug_offsets, tuple(_FROM_DEBUG_OFFSETS.values()))
    facts = COROUTINE_FACTS.get(version)
    if facts is None:
        known = ", ".join(f"{v[0]}.{v[1]}" for v in sorted(COROUTINE_FACTS))
        raise MalformedInput(f"CPython {version[0]}.{version[1]}: the frame states of its "
                             f"coroutines and where an await keeps what it awaits are not known (known: {known})")
    if len(asyncio_debug_offsets) != ASYNCIO_DEBUG_OFFSETS_SIZE:
        raise MalformedInput(f"_Py_AsyncioModuleDebugOffsets of CPython {version[0]}.{version[1]} take "
                             f"{len(asyncio_debug_offsets)} bytes, not the {ASYNCIO_DEBUG_OFFSETS_SIZE} of the "
                             "known member list: the version needs a member list of its own")
    values = iter(struct.unpack(f"<{ASYNCIO_DEBUG_OFFSETS_SIZE // 8}Q", asyncio_debug_offsets))
    asyncio = {f"{group}.{member}": next(values) for group, members in _ASYNCIO_DEBUG_OFFSETS for member in members}
    task_size = asyncio["asyncio_task_object.size"]
    problems = [problem for problem in (offset_problem(name, asyncio[name], asyncio[name.split(".")[0] + ".size"])
                                        for name in _FROM_ASYNCIO_DEBUG_OFFSETS.values()) if problem]
    if task_size > _MAX_TASK_SIZE:
        problems.append(f"asyncio_task_object.size = {task_size} is above {_MAX_TASK_SIZE}")
    if problems:
        raise MalformedInput(f"_Py_AsyncioModuleDebugOffsets of CPython {version[0]}.{version[1]}: "
                             f"{'; '.join(problems)}")
    return AsyncioLayout(
        tasks_global="", set_mask=ABSENT, set_table=ABSENT, weakref_object=ABSENT, task_loop=ABSENT,
        frame_stacktop=ABSENT,
        suspended_in_await=facts.suspended_in_await, awaited_slot=facts.awaited_slot,
        **{field: members[name] for field, name in _FROM_DEBUG_OFFSETS.items()},
        **{field: asyncio[name] for field, name in _FROM_ASYNCIO_DEBUG_OFFSETS.items()},
    )
