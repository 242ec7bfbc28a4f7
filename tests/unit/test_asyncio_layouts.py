"""The asyncio layout of 3.14+ from the offsets CPython publishes, on synthetic data: the
start of a _PyRuntime (test_python_layouts' member lists, with the values of Debian's
3.14.10 and 3.15.2) and the .AsyncioDebug sections of the same builds. Every offset read
must lie inside its structure and be aligned, and what fails is named, each in one
message; a version whose coroutines' facts are not known is refused, saying so."""

from __future__ import annotations

import struct

import pytest
from test_python_layouts import DEBUG_OFFSETS_3_14_10, DEBUG_OFFSETS_3_15_2, FUTURE_HEX, synthetic_runtime

from bpfprof.symbolizer.errors import MalformedInput
from bpfprof.symbolizer.interpreters.python.asyncio_layouts import (ASYNCIO_DEBUG_OFFSETS_SIZE, AsyncioLayout,
                                                                    asyncio_layout_from_debug_offsets)
from bpfprof.symbolizer.interpreters.python.layouts import ABSENT

HEX_3_14_10, HEX_3_15_2 = 0x030E0AF0, 0x030F02F0

# _Py_AsyncioModuleDebugOffsets as the builds hold them: asyncio_task_object (size,
# task_name, task_awaited_by, task_is_task, task_awaited_by_is_set, task_coro, task_node),
# asyncio_interpreter_state (size, asyncio_tasks_head), asyncio_thread_state (size,
# asyncio_running_loop, asyncio_running_task, asyncio_tasks_head).
ASYNCIO_3_14_10 = (168, 136, 96, 108, 109, 128, 152, 225864, 10880, 936, 864, 872, 880)
ASYNCIO_3_15_2 = (168, 136, 96, 108, 109, 128, 152, 226240, 10856, 1104, 1024, 1032, 1048)
TASK_NODE, RUNNING_LOOP = 6, 10  # indexes of two of them

LAYOUT_3_14_10 = AsyncioLayout(
    tasks_global="", type_name=24, set_mask=ABSENT, set_table=ABSENT, weakref_object=ABSENT,
    task_loop=ABSENT, task_coro=128, task_name=136,
    gen_frame_state=67, gen_iframe=72, frame_stacktop=ABSENT, frame_localsplus=80,
    suspended_in_await=frozenset({-1}), awaited_slot=1,
    frame_stackpointer=64, task_node=152, tstate_running_loop=864, tstate_tasks_head=880, llist_next=0,
)


def section(values) -> bytes:
    return struct.pack(f"<{len(values)}Q", *values)


def replaced(values, *changes):
    values = list(values)
    for index, value in changes:
        values[index] = value
    return tuple(values)


def layout_of(groups=DEBUG_OFFSETS_3_14_10, version_hex=HEX_3_14_10, asyncio=ASYNCIO_3_14_10) -> AsyncioLayout:
    return asyncio_layout_from_debug_offsets(synthetic_runtime(groups, version_hex), section(asyncio))


def refusal(**kwargs) -> str:
    with pytest.raises(MalformedInput) as raised:
        layout_of(**kwargs)
    return str(raised.value)


def test_3_14():
    assert layout_of() == LAYOUT_3_14_10


def test_3_15():
    layout = layout_of(DEBUG_OFFSETS_3_15_2, HEX_3_15_2, ASYNCIO_3_15_2)
    assert layout.suspended_in_await == frozenset({2, 3}) and layout.awaited_slot == 2
    assert (layout.tstate_running_loop, layout.tstate_tasks_head) == (1024, 1048)


def test_each_offset_outside_its_structure_or_misaligned_is_named_in_one_message():
    message = refusal(asyncio=replaced(ASYNCIO_3_14_10, (TASK_NODE, 168), (RUNNING_LOOP, 862)))
    assert message == ("_Py_AsyncioModuleDebugOffsets of CPython 3.14: "
                       "asyncio_task_object.task_node = 168 is not below the structure's size 168; "
                       "asyncio_thread_state.asyncio_running_loop = 862 is not 8-byte aligned")


def test_a_task_too_large_to_read():
    message = refusal(asyncio=replaced(ASYNCIO_3_14_10, (0, 1 << 20)))
    assert message.endswith("asyncio_task_object.size = 1048576 is above 4096")


def test_a_section_of_another_size_needs_a_member_list_of_its_own():
    with pytest.raises(MalformedInput, match="take 112 bytes, not the 104 of the known member list"):
        asyncio_layout_from_debug_offsets(synthetic_runtime(DEBUG_OFFSETS_3_14_10, HEX_3_14_10),
                                          section(ASYNCIO_3_14_10 + (8,)))
    assert ASYNCIO_DEBUG_OFFSETS_SIZE == 104


def test_the_coroutine_members_of_the_debug_offsets_are_checked():
    groups = tuple((group, tuple((m, 161 if (group, m) == ("gen_object", "gi_frame_state") else v) for m, v in members))
                   for group, members in DEBUG_OFFSETS_3_14_10)
    assert refusal(groups=groups) == ("_Py_DebugOffsets of CPython 3.14: "
                                      "gen_object.gi_frame_state = 161 is not below the structure's size 160")


def test_a_version_whose_coroutines_are_not_known_is_refused_saying_what_is_missing():
    message = refusal(groups=DEBUG_OFFSETS_3_15_2, version_hex=FUTURE_HEX, asyncio=ASYNCIO_3_15_2)
    assert message == ("CPython 3.16: the frame states of its coroutines and where an await keeps what it "
                       "awaits are not known (known: 3.14, 3.15)")
