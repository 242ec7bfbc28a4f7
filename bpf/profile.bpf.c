/* CPU sampler: runs on every CPU's perf clock tick and aggregates stacks in kernel.
 *
 * Settings arrive as -D flags from the collector's config:
 *   COUNTS_ENTRIES, STACK_ENTRIES, TARGET_ENTRIES, SEEN_ENTRIES, EVENT_PAGES  map sizes
 *   FILTER_PIDS     only sample processes in `targets`
 *   FOLLOW_CHILDREN add the children of targets to `targets` as they fork
 *   KERNEL_STACKS   capture kernel stacks
 *   PYTHON_STACKS   walk CPython frames of processes in `python_processes`
 *   PYTHON_PROCESSES, PYTHON_THREADS, PYTHON_STACK_ENTRIES   their map sizes
 *
 * Double buffering: `control[0]` names the buffer samples go to. The collector flips it,
 * lets in-flight samples finish, then drains and clears the other buffer, so no sample
 * is lost between reading a map and clearing it.
 */
/* Only errno: the perf context is passed through as `void *`, because including
 * bpf_perf_event.h pulls in headers that make bcc's compile five times slower. */
#include <uapi/asm-generic/errno-base.h>
#include "profile.h"

BPF_ARRAY(control, u32, 1);
BPF_HASH(counts_0, struct sample_key, u64, COUNTS_ENTRIES);
BPF_HASH(counts_1, struct sample_key, u64, COUNTS_ENTRIES);
BPF_STACK_TRACE(stacks_0, STACK_ENTRIES);
BPF_STACK_TRACE(stacks_1, STACK_ENTRIES);
BPF_PERCPU_ARRAY(losses, u64, LOSS_REASONS);
BPF_HASH(targets, u32, u8, TARGET_ENTRIES);
BPF_TABLE("lru_hash", u32, u8, seen, SEEN_ENTRIES);
BPF_RINGBUF_OUTPUT(events, EVENT_PAGES);
#if PYTHON_STACKS
BPF_HASH(python_processes, u32, struct python_process, PYTHON_PROCESSES);
BPF_HASH(python_threads, struct python_thread, u64, PYTHON_THREADS);  /* -> PyThreadState address */
BPF_TABLE("lru_hash", u32, u8, python_asked, PYTHON_THREADS);       /* tids reported unknown */
BPF_PERCPU_ARRAY(python_scratch, struct python_stack, 1);
BPF_HASH(python_stacks_0, u64, struct python_stack, PYTHON_STACK_ENTRIES);
BPF_HASH(python_stacks_1, u64, struct python_stack, PYTHON_STACK_ENTRIES);
#endif

static __always_inline void count_loss(int reason)
{
    u64 *n = losses.lookup(&reason);
    if (n)
        (*n)++;
}

static __always_inline void emit(u32 kind, u32 pid, u32 tid)
{
    struct process_event event = {.kind = kind, .pid = pid, .tid = tid};
    bpf_get_current_comm(&event.comm, sizeof(event.comm));
    if (events.ringbuf_output(&event, sizeof(event), 0) != 0)
        count_loss(LOSS_EVENTS_FULL);
}

static __always_inline int is_target(u32 pid)
{
#if FILTER_PIDS
    return targets.lookup(&pid) != NULL;
#else
    return 1;
#endif
}

/* -EFAULT means there was no stack of that kind to take (e.g. a user-mode sample has
 * no kernel stack); it is not a loss. */
static __always_inline void count_stack_error(s32 id, int collision, int failed)
{
    if (id == -EEXIST)
        count_loss(collision);
    else if (id < 0 && id != -EFAULT)
        count_loss(failed);
}

#if PYTHON_STACKS
/* Reads without branches (a failed read leaves 0), so that the verifier has few
 * paths to follow through the frame loop. */
static __always_inline u64 read_pointer(u64 base, s32 offset)
{
    u64 value = 0;
    bpf_probe_read_user(&value, sizeof(value), (void *)(base + offset));
    return value;
}

static __always_inline s32 read_s32(u64 base, s32 offset)
{
    s32 value = 0;
    bpf_probe_read_user(&value, sizeof(value), (void *)(base + offset));
    return value;
}

/* The current thread's PyThreadState, or 0. An unknown thread is reported once, so
 * that the collector looks for it in the interpreter's thread list. */
static __always_inline u64 python_thread_state(u32 pid, u32 tid)
{
    struct python_thread thread = {.pid = pid, .tid = tid};
    u64 *tstate = python_threads.lookup(&thread);
    if (tstate)
        return *tstate;
    if (python_asked.lookup(&tid) == NULL) {
        u8 one = 1;
        python_asked.update(&tid, &one);
        emit(PYTHON_THREAD_UNKNOWN, pid, tid);
    }
    return 0;
}

/* Walks the thread's Python frames, leaf first, into the per-CPU scratch stack and
 * returns its hash (0: no Python frames). Slot i holds the i-th frame, shim frames
 * included (the collector drops them), so that every path through the loop is at the
 * same slot and the verifier can prune them: the loop body has no branch that decides
 * where the next frame goes. */
static __always_inline u64 walk_python(struct python_process *py, struct python_stack *stack, u64 tstate)
{
    u64 frame = read_pointer(tstate, py->tstate_frame);
    if (py->frame_chain == PYTHON_CFRAME)
        frame = read_pointer(frame, py->cframe_current_frame);
    /* <= 3.10 every frame object is an entry of the eval loop and f_lasti an int;
     * later the instruction is an address inside the code object. */
    u64 objects = py->frame_chain == PYTHON_FRAME_OBJECTS;
    u64 hash = 14695981039346656037ULL;  /* FNV-1a */
    u32 depth = 0;
#pragma clang loop unroll(disable)
    for (u32 i = 0; i < PYTHON_STACK_DEPTH; i++) {
        if (!frame)
            break;
        struct python_frame *f = &stack->frames[i];
        /* 3.14 tags the low bits of f_executable (a _PyStackRef); objects are aligned. */
        u64 code = read_pointer(frame, py->frame_code) & ~3ULL;
        u64 instr = read_pointer(frame, py->frame_instr);
        u64 name = read_pointer(code, py->code_name);
        u8 owner = 0, entry = 0;
        if (py->frame_owner >= 0)
            bpf_probe_read_user(&owner, 1, (void *)(frame + py->frame_owner));
        if (py->frame_is_entry >= 0)
            bpf_probe_read_user(&entry, 1, (void *)(frame + py->frame_is_entry));
        f->code = code;
        f->instr = objects ? (s32)instr : (s32)(instr - code);
        f->check = (u16)(read_s32(code, py->code_firstlineno) ^ (name >> 4) ^ (name >> 20));
        f->flags = (u16)((owner >= PYTHON_OWNED_BY_SHIM) * PYTHON_FRAME_SHIM |
                         (objects | entry) * PYTHON_FRAME_ENTRY);
        hash = (hash ^ code) * 1099511628211ULL;
        hash = (hash ^ (u32)f->instr) * 1099511628211ULL;
        depth = i + 1;
        frame = read_pointer(frame, py->frame_previous);
    }
    stack->depth = depth;
    stack->truncated = frame != 0;
    if (depth == 0)
        return 0;
    if (frame)
        count_loss(LOSS_PYTHON_TRUNCATED);
    return hash | 1;
}
#endif

int on_cpu_sample(void *ctx)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 pid = pid_tgid >> 32;
    u32 tid = (u32)pid_tgid;

    if (pid == 0 || !is_target(pid))  /* pid 0: the idle task */
        return 0;

    if (seen.lookup(&pid) == NULL) {
        u8 one = 1;
        seen.update(&pid, &one);
        emit(PROCESS_SEEN, pid, tid);
    }

    struct sample_key key = {.pid = pid, .tid = tid};
    bpf_get_current_comm(&key.thread_name, sizeof(key.thread_name));

    /* bcc rewrites map calls only where they are written out, not in a macro or
     * through a pointer, so each buffer gets its own three lines. */
    int zero_index = 0;
    u32 *buffer = control.lookup(&zero_index);
    u64 zero = 0, *count;
#if PYTHON_STACKS
    struct python_process *py = python_processes.lookup(&pid);
    struct python_stack *python = python_scratch.lookup(&zero_index);
    if (py && python) {
        u64 tstate = python_thread_state(pid, tid);
        if (tstate)
            key.python_stack = walk_python(py, python, tstate);
    }
    if (key.python_stack) {
        int stored;
        if (buffer && *buffer)
            stored = python_stacks_1.update(&key.python_stack, python);
        else
            stored = python_stacks_0.update(&key.python_stack, python);
        if (stored != 0) {
            count_loss(LOSS_PYTHON_STACKS_FULL);
            key.python_stack = 0;
        }
    }
#endif
    if (buffer && *buffer) {
        key.kernel_stack_id = KERNEL_STACKS ? stacks_1.get_stackid(ctx, 0) : -EFAULT;
        key.user_stack_id = stacks_1.get_stackid(ctx, BPF_F_USER_STACK);
        count = counts_1.lookup_or_try_init(&key, &zero);
    } else {
        key.kernel_stack_id = KERNEL_STACKS ? stacks_0.get_stackid(ctx, 0) : -EFAULT;
        key.user_stack_id = stacks_0.get_stackid(ctx, BPF_F_USER_STACK);
        count = counts_0.lookup_or_try_init(&key, &zero);
    }
    if (count)
        __sync_fetch_and_add(count, 1);
    else
        count_loss(LOSS_COUNTS_FULL);

    count_stack_error(key.kernel_stack_id, LOSS_KERNEL_STACK_COLLISION, LOSS_KERNEL_STACK_FAILED);
    count_stack_error(key.user_stack_id, LOSS_USER_STACK_COLLISION, LOSS_USER_STACK_FAILED);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exec)
{
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    if (!is_target(pid))
        return 0;
    /* Libraries are mapped after exec: the next sample takes the snapshot. */
    seen.delete(&pid);
    emit(PROCESS_EXEC, pid, pid);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 pid = pid_tgid >> 32;
    u32 tid = (u32)pid_tgid;
    if (!is_target(pid))
        return 0;
#if FOLLOW_CHILDREN
    /* sched_process_fork cannot tell threads from processes, so each thread got an
     * entry of its own; drop it with the thread. */
    if (tid != pid)
        targets.delete(&tid);
#endif
#if PYTHON_STACKS
    python_asked.delete(&tid);
    if (args->group_dead)
        python_processes.delete(&pid);
#endif
    if (args->group_dead) {
        seen.delete(&pid);
        targets.delete(&pid);
        emit(PROCESS_EXIT, pid, tid);
    }
    return 0;
}

#if FOLLOW_CHILDREN
TRACEPOINT_PROBE(sched, sched_process_fork)
{
    u32 parent = bpf_get_current_pid_tgid() >> 32;
    u32 child = args->child_pid;
    u8 one = 1;
    /* The child's pid is its tgid when it starts a new process; for a new thread it
     * is a tid, which is harmless here and removed again when the thread exits. */
    if (is_target(parent) && child != parent && targets.update(&child, &one) != 0)
        count_loss(LOSS_TARGETS_FULL);
    return 0;
}
#endif
