"""Where asyncio keeps its tasks inside a running CPython, for reading them from another
process (asyncio_tasks.py).

The tasks of 3.11 to 3.13 are found through a module global of `asyncio.tasks`: a WeakSet
(`_all_tasks` in 3.11, `_scheduled_tasks` from 3.12 on) whose `data` attribute is a set of
weak references to the tasks. A task is a TaskObj of the C module _asyncio
(Modules/_asynciomodule.c, not an installed header: its offsets are checked against live
interpreters by tests/unit/test_asyncio_tasks.py); its coroutine is a PyGenObject
(cpython/genobject.h) with its _PyInterpreterFrame inline (internal/pycore_frame.h); a
coroutine suspended in an `await` keeps what it awaits on the top of its value stack.

All numbers are for x86-64 Linux release builds with the GIL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, FrozenSet, Optional, Tuple


@dataclass(frozen=True)
class AsyncioLayout:
    """Byte offsets of the objects asyncio's tasks are made of, for one minor version."""

    tasks_global: str                # the WeakSet of asyncio.tasks that holds every task
    type_name: int                   # offsetof(PyTypeObject, tp_name), a char *
    set_mask: int                    # offsetof(PySetObject, mask)
    set_table: int                   # offsetof(PySetObject, table): setentry {key, hash}
    weakref_object: int              # offsetof(PyWeakReference, wr_object)
    task_loop: int                   # TaskObj.task_loop: the event loop it runs on
    task_coro: int                   # TaskObj.task_coro
    task_name: int                   # TaskObj.task_name: a str, or (3.12+) an int N for "Task-N"
    task_size: int                   # sizeof(TaskObj)
    gen_frame_state: int             # offsetof(PyGenObject, gi_frame_state), an int8_t
    gen_iframe: int                  # offsetof(PyGenObject, gi_iframe): the frame, inline
    frame_stacktop: int              # offsetof(_PyInterpreterFrame, stacktop), an int: TOS index + 1
    frame_localsplus: int            # offsetof(_PyInterpreterFrame, localsplus)
    suspended_in_await: FrozenSet[int]  # gi_frame_state values of a coroutine suspended in an await


# (3.11, 3.12) enum _framestate: FRAME_SUSPENDED = -1, for a plain yield and an await
# alike; a coroutine (of `async def`) only suspends in an await. 3.13 tells them apart:
# FRAME_SUSPENDED_YIELD_FROM = -1, FRAME_SUSPENDED = -2.
_SUSPENDED_IN_AWAIT = frozenset({-1})

ASYNCIO_LAYOUTS: Dict[Tuple[int, int], AsyncioLayout] = {
    # 3.11: PyGenObject still opens with gi_code, so its frame comes one pointer later.
    (3, 11): AsyncioLayout(
        tasks_global="_all_tasks", type_name=24, set_mask=32, set_table=40, weakref_object=16,
        task_loop=16, task_coro=136, task_name=144, task_size=176,
        gen_frame_state=75, gen_iframe=80, frame_stacktop=64, frame_localsplus=72,
        suspended_in_await=_SUSPENDED_IN_AWAIT,
    ),
    (3, 12): AsyncioLayout(
        tasks_global="_scheduled_tasks", type_name=24, set_mask=32, set_table=40, weakref_object=16,
        task_loop=16, task_coro=136, task_name=144, task_size=176,
        gen_frame_state=67, gen_iframe=72, frame_stacktop=64, frame_localsplus=72,
        suspended_in_await=_SUSPENDED_IN_AWAIT,
    ),
    # 3.13: FutureObj is two pointers shorter, so TaskObj's own members come earlier.
    (3, 13): AsyncioLayout(
        tasks_global="_scheduled_tasks", type_name=24, set_mask=32, set_table=40, weakref_object=16,
        task_loop=16, task_coro=120, task_name=128, task_size=144,
        gen_frame_state=67, gen_iframe=72, frame_stacktop=64, frame_localsplus=72,
        suspended_in_await=_SUSPENDED_IN_AWAIT,
    ),
}


def asyncio_layout_for(version: Tuple[int, int]) -> Optional[AsyncioLayout]:
    """The asyncio layout of a CPython (major, minor), or None where tasks are not read."""
    return ASYNCIO_LAYOUTS.get(tuple(version))
