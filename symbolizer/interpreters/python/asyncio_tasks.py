"""The asyncio tasks of a CPython process that are awaiting something, read out of its
memory: each task's name, the thread its event loop runs on, and its await chain.

A task waiting on I/O is on no thread's stack: its coroutine is suspended in an `await`,
and so is every coroutine it awaits, down to the one that awaits a future. From the
outside, for each interpreter:

    3.11-3.13: sys.modules -> ["asyncio.tasks"] -> the WeakSet of tasks (AsyncioLayout.tasks_global)
                 -> its `data` set -> weak references -> TaskObj -> task_loop -> its thread
    3.14+:     each thread state whose asyncio_running_loop is set -> asyncio_tasks_head
                 -> the circular list through each TaskObj's task_node
      -> task_coro, a coroutine -> its inline frame (code object, instruction)
         -> near the end of its value stack, what it awaits: a coroutine again, or the end

A task whose coroutine runs is left out (its frames are on its thread's stack), and so is
one not started or finished, or whose loop runs on no thread (3.14+: one of a thread that
has ended, in the interpreter's own list). Objects are told apart by their type's tp_name
("coroutine", "str", "int"), read once per type.

Only memory is read: what is read may change underneath or be garbage, so every loop and
size is bounded and what does not look right raises UnreadableMemory (a whole read) or
leaves one task out.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from bpfprof.symbolizer.interpreters.python.asyncio_layouts import AsyncioLayout
from bpfprof.symbolizer.interpreters.python.code_objects import check_of
from bpfprof.symbolizer.interpreters.python.layouts import ABSENT, PythonLayout
from bpfprof.symbolizer.interpreters.python.objects import read_str
from bpfprof.symbolizer.interpreters.python.thread_names import ObjectReader, Searches
from bpfprof.symbolizer.interpreters.python.threads import interpreters, thread_states
from bpfprof.symbolizer.process_memory import ProcessMemory, UnreadableMemory

MAX_TASKS = 4096          # tasks looked at per read
MAX_SET_SLOTS = 1 << 16   # slots of the set of tasks
MAX_CHAIN = 64            # coroutines followed down one await chain
MAX_STACK = 1 << 16       # entries of a frame's value stack
MAX_NAME_LENGTH = 256     # characters kept of a task name
MAX_TYPES = 1024          # type names remembered
MAX_LOOPS = 256           # event loops whose threads are remembered
LOOP_READS = 20           # reads a loop's thread is remembered for (a loop seldom moves to another thread)
_TYPE_NAME_BYTES = 16     # read of a tp_name, enough for the names looked for
_COROUTINE_TYPES = ("coroutine", "generator")  # async def; @types.coroutine generators
_TAG_BITS = 3  # 3.14+: the low bits of a _PyStackRef (f_executable, stack entries) that tag it


@dataclass(frozen=True)
class AwaitingTask:
    address: int  # of the task object
    name: str
    loop_thread: int  # threading.get_ident() of the loop's thread: PyThreadState.thread_id
    # (code object, instruction - code object, check) of each coroutine, the innermost awaited first
    chain: Tuple[Tuple[int, int, int], ...]


class TaskReader:
    """Reads the awaiting tasks of one process again and again, keeping what it found on
    the way (where the tasks are, the names of types)."""

    def __init__(self, memory: ProcessMemory, layout: PythonLayout, asyncio: AsyncioLayout, runtime: int) -> None:
        self.memory = memory
        self.layout = layout
        self.a = asyncio
        self.runtime = runtime
        self.searches = Searches()
        self._type_names: Dict[int, str] = {}
        self._loops: Dict[int, Tuple[int, int]] = {}  # loop -> (its thread's ident or 0, reads left)
        # One read of a code object takes both members its check is made of.
        self._code_header = max(layout.code_firstlineno + 4, layout.code_name + 8)
        # And one of a task, the members read of it.
        self._task_head = max(asyncio.task_loop, asyncio.task_coro, asyncio.task_name) + 8
        # One read of a coroutine takes its state and its frame up to the value stack.
        frame_end = max(asyncio.frame_localsplus, asyncio.frame_stacktop + 4, asyncio.frame_stackpointer + 8,
                        layout.frame_code + 8, layout.frame_instr + 8)
        self._coroutine_head = max(asyncio.gen_frame_state + 1, asyncio.gen_iframe + frame_end)

    def awaiting_tasks(self) -> List[AwaitingTask]:
        """The tasks of every interpreter that await something now (none without asyncio).
        Raises UnreadableMemory when the process is gone or its interpreter unreadable."""
        reader = ObjectReader(self.memory, self.layout, self.searches)
        if self.a.tstate_tasks_head != ABSENT:
            return self._listed_tasks(reader)
        self._loops = {loop: (ident, left - 1) for loop, (ident, left) in self._loops.items() if left > 1}
        if len(self._loops) > MAX_LOOPS:
            self._loops.clear()
        tasks: List[AwaitingTask] = []
        for interp in interpreters(self.memory, self.layout, self.runtime):
            modules = self.memory.pointer(interp + self.layout.interp_modules)
            if not modules:
                continue  # an interpreter being created or torn down
            weak_set = reader.module_global(modules, "asyncio.tasks", self.a.tasks_global)
            data = reader.attribute(weak_set, "data") if weak_set else None
            if data:
                tasks.extend(self._found(reader, self._set_items(data, MAX_TASKS - len(tasks)), None))
        return tasks

    def _listed_tasks(self, reader: ObjectReader) -> List[AwaitingTask]:
        """3.14+: the awaiting tasks in the lists of the threads that run a loop."""
        a, memory = self.a, self.memory
        memory.pointer(self.runtime + self.layout.runtime_interpreters_head)  # raises when the process is gone
        tasks: List[AwaitingTask] = []
        left = MAX_TASKS  # tasks looked at, in all the lists
        for tstate, ident, _ in thread_states(memory, self.layout, self.runtime):
            if not left:
                break
            if not ident or not memory.pointer(tstate + a.tstate_running_loop):
                continue
            head = tstate + a.tstate_tasks_head
            listed: List[int] = []
            node = memory.pointer(head + a.llist_next)
            while node and node != head and len(listed) < left:
                listed.append(node - a.task_node)
                node = memory.pointer(node + a.llist_next)
            left -= len(listed)
            tasks.extend(self._found(reader, listed, ident))
        return tasks

    def _found(self, reader: ObjectReader, listed: List[int], thread: Optional[int]) -> List[AwaitingTask]:
        """The tasks among `listed` that await something, on the loop thread `thread`
        (None: each task's loop tells)."""
        tasks: List[AwaitingTask] = []
        for task in listed:
            try:
                found = self._awaiting(reader, task, thread)
            except UnreadableMemory:
                continue  # a task ending while we look: leave it out
            if found is not None:
                tasks.append(found)
        return tasks

    def _set_items(self, address: int, limit: int) -> List[int]:
        """The objects referred to by the weak references of a set, at most `limit`."""
        memory = self.memory
        mask, table = memory.s64(address + self.a.set_mask), memory.pointer(address + self.a.set_table)
        if not 0 <= mask < MAX_SET_SLOTS or (mask + 1) & mask:
            raise UnreadableMemory(f"not a set at {address:#x} (mask {mask:#x})")
        data = memory.read(table, (mask + 1) * 16)  # setentry: key, hash
        objects: List[int] = []
        for (key, _) in struct.iter_unpack("<QQ", data):
            if len(objects) >= limit:
                break
            if key:  # an empty slot has none; a deleted one holds a dummy that is no task
                target = memory.pointer(key + self.a.weakref_object)
                if target:
                    objects.append(target)
        return objects

    def _awaiting(self, reader: ObjectReader, task: int, thread: Optional[int]) -> Optional[AwaitingTask]:
        a = self.a
        raw = self.memory.read(task, self._task_head)
        coro, name = (struct.unpack_from("<Q", raw, at)[0] for at in (a.task_coro, a.task_name))
        if self.type_name(coro) not in _COROUTINE_TYPES:
            return None  # not a task (a dead reference), or one driving some other awaitable
        chain = self._chain(coro)
        if not chain:
            return None
        if thread is None:
            thread = self._loop_thread(reader, struct.unpack_from("<Q", raw, a.task_loop)[0])
        if not thread:
            return None  # its loop is not running
        return AwaitingTask(task, self._task_name(reader, name), thread, tuple(reversed(chain)))

    def _loop_thread(self, reader: ObjectReader, loop: int) -> int:
        """The ident of the thread a loop runs on (its `_thread_id`), 0 when it is not running."""
        if loop not in self._loops:
            ident = reader.attribute(loop, "_thread_id")
            thread = (reader.read_ident(ident) or 0) if ident and self.type_name(ident) == "int" else 0
            self._loops[loop] = (thread, LOOP_READS)
        return self._loops[loop][0]

    def _chain(self, coro: int) -> List[Tuple[int, int, int]]:
        """(code, instruction, check) of the coroutine and of each it awaits, outermost
        first; empty when the coroutine is not suspended in an await."""
        a, layout, memory = self.a, self.layout, self.memory
        chain: List[Tuple[int, int, int]] = []
        while len(chain) < MAX_CHAIN:
            raw = memory.read(coro, self._coroutine_head)
            state = struct.unpack_from("<b", raw, a.gen_frame_state)[0]
            if state not in a.suspended_in_await:
                break
            frame = a.gen_iframe
            code, instr = (struct.unpack_from("<Q", raw, frame + at)[0] for at in (layout.frame_code, layout.frame_instr))
            code &= ~_TAG_BITS
            stack = coro + frame + a.frame_localsplus
            if a.frame_stackpointer != ABSENT:
                entries, unaligned = divmod(struct.unpack_from("<Q", raw, frame + a.frame_stackpointer)[0] - stack, 8)
                entries = entries if not unaligned else 0
            else:
                entries = struct.unpack_from("<i", raw, frame + a.frame_stacktop)[0]
            header = memory.read(code, self._code_header)
            check = check_of(struct.unpack_from("<i", header, layout.code_firstlineno)[0],
                             struct.unpack_from("<Q", header, layout.code_name)[0])
            chain.append((code, instr - code, check))  # the instruction as the BPF walker takes it
            if not a.awaited_slot <= entries <= MAX_STACK:
                break
            awaited = memory.pointer(stack + 8 * (entries - a.awaited_slot)) & ~_TAG_BITS
            if self.type_name(awaited) not in _COROUTINE_TYPES:
                break  # a future, or something else that is no coroutine: the chain ends
            coro = awaited
        return chain

    def _task_name(self, reader: ObjectReader, name: int) -> str:
        kind = self.type_name(name)
        if kind == "str":
            return read_str(self.memory, self.layout, name, MAX_NAME_LENGTH)
        number = reader.read_ident(name) if kind == "int" else None  # 3.12+: named when asked
        return f"Task-{number}" if number is not None else "[unreadable task name]"

    def type_name(self, address: int) -> str:
        """The tp_name of an object's type ("" for no object)."""
        if not address:
            return ""
        tp = self.memory.pointer(address + self.layout.objects.object_type)
        name = self._type_names.get(tp)
        if name is None:
            if len(self._type_names) >= MAX_TYPES:
                self._type_names.clear()
            raw = self.memory.read(self.memory.pointer(tp + self.a.type_name), _TYPE_NAME_BYTES)
            name = self._type_names[tp] = raw.split(b"\0", 1)[0].decode("latin-1")
        return name
