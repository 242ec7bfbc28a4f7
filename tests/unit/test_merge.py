"""Joining native and Python frames into one stack (symbolizer/interpreters/merge.py), with
CPython's eval loop."""

from types import SimpleNamespace

from bpfprof.symbolizer.frames import Frame, FrameKind, Module
from bpfprof.symbolizer.interpreters.merge import merge
from bpfprof.symbolizer.interpreters.python.code_objects import EVAL_FUNCTIONS

PYTHON = Module("/usr/lib/libpython3.12.so.1.0")
CPYTHON = SimpleNamespace(module_path=PYTHON.path, eval_functions=EVAL_FUNCTIONS)  # an InterpreterProcess
EXE = Module("/usr/bin/python3.12")
LIBC = Module("/usr/lib/x86_64-linux-gnu/libc.so.6")
EXTENSION = Module("/usr/lib/python3.12/lib-dynload/zlib.cpython-312.so")


def native(name, module):
    return Frame(FrameKind.NATIVE, name, module)


def py(name):
    return Frame(FrameKind.PYTHON, name, None, 0, "app.py", 1, 1)


def names(frames):
    return [f.name for f in frames]


ROOT = [native("_PyEval_EvalFrameDefault", PYTHON), native("Py_RunMain", PYTHON), native("main", EXE),
        native("__libc_start_call_main", LIBC)]  # leaf first, as unwound with frame pointers


def test_each_eval_loop_frame_runs_its_group_of_python_frames():
    # main -> eval loop (<module>, handler) -> the interpreter's call machinery -> an
    # extension calling back -> eval loop (key) -> compress
    stack = ([native("deflate", EXTENSION), native("zlib_compress", EXTENSION),
              native("_PyEval_EvalFrameDefault", PYTHON), native("PyObject_Call", PYTHON),
              native("call_back", EXTENSION), native("_PyObject_Call", PYTHON),
              native("_PyEval_EvalFrameDefault", PYTHON), native("PyEval_EvalCode", PYTHON)] + ROOT[1:])
    python = [(py("key"), True), (py("handler"), False), (py("<module>"), True)]  # leaf first
    merged = merge(stack, python, CPYTHON)
    assert names(merged[::-1]) == ["__libc_start_call_main", "main", "Py_RunMain", "PyEval_EvalCode", "<module>",
                                   "handler", "call_back", "key", "zlib_compress", "deflate"]


def test_a_stack_the_unwinder_completed_needs_no_known_root():
    # A thread's outermost frames in a stripped libc have no names (start_thread, clone3).
    stack = [native("_PyEval_EvalFrameDefault", PYTHON), native("thread_run", PYTHON),
             Frame(FrameKind.NATIVE, "[libc.so.6+0x891f4]", LIBC)]
    python = [(py("work"), True)]
    assert names(merge(stack, python, CPYTHON, complete=True)[::-1]) == [
        "[libc.so.6+0x891f4]", "thread_run", "work"]
    assert names(merge(stack, python, CPYTHON)[::-1]) == ["work"]


def test_group_count_mismatch_puts_all_python_frames_between_the_outer_and_inner_eval_loops():
    stack = [native("PyLong_FromLong", PYTHON)] + ROOT
    python = [(py("key"), True), (py("<module>"), True)]  # two groups, one eval frame seen
    merged = merge(stack, python, CPYTHON)
    assert names(merged[::-1]) == ["__libc_start_call_main", "main", "Py_RunMain", "<module>", "key",
                                   "PyLong_FromLong"]


def test_without_a_complete_native_stack_python_frames_stand_in_for_the_interpreter():
    # No frame pointers in libpython: after the leaf the unwinder went astray.
    # What the extension was called through in the interpreter is kept; below that, noise.
    stack = [native("zlib_compress", EXTENSION), native("cfunction_vectorcall_O", PYTHON),
             native("garbage", LIBC), Frame(FrameKind.NATIVE, "[unmapped 0x7f00]")]
    python = [(py("compress"), False), (py("<module>"), True)]
    merged = merge(stack, python, CPYTHON)
    assert names(merged[::-1]) == ["<module>", "compress", "cfunction_vectorcall_O", "zlib_compress"]


def test_leaf_in_the_interpreter_is_kept_above_the_python_frames():
    stack = [native("_PyObject_Malloc", PYTHON), native("garbage", LIBC)]
    merged = merge(stack, [(py("area_sum"), True)], CPYTHON)
    assert names(merged[::-1]) == ["area_sum", "_PyObject_Malloc"]


def test_leaf_in_the_eval_loop_itself_leaves_only_python_frames():
    stack = [native("_PyEval_EvalFrameDefault", PYTHON), Frame(FrameKind.NATIVE, "[unmapped 0x1]")]
    merged = merge(stack, [(py("area_sum"), False), (py("<module>"), True)], CPYTHON)
    assert names(merged[::-1]) == ["<module>", "area_sum"]
