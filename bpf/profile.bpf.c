/* CPU sampler: runs on every CPU's perf clock tick and aggregates stacks in kernel.
 *
 * Settings arrive as -D flags from the collector's config:
 *   COUNTS_ENTRIES, STACK_ENTRIES, TARGET_ENTRIES, SEEN_ENTRIES, EVENT_PAGES  map sizes
 *   FILTER_PIDS     only sample processes in `targets`
 *   FOLLOW_CHILDREN add the children of targets to `targets` as they fork
 *   KERNEL_STACKS   capture kernel stacks
 *   PYTHON_STACKS   walk CPython frames of processes in `python_processes`
 *   PYTHON_PROCESSES, PYTHON_THREADS, PYTHON_STACK_ENTRIES, PYTHON_EVENT_PAGES   their sizes
 *   OFFCPU          follow threads leaving the CPU (sched_switch), for
 *   OFFCPU_BLOCK    blocking delay, blocks of MIN_BLOCK_NS or more (block_N), and
 *   OFFCPU_WALL     off-CPU time of every kind, for wall-clock profiles (wall_N)
 *   OFFCPU_THREADS  threads away at once
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
BPF_TABLE("lru_hash", u32, u8, maps_pending, SEEN_ENTRIES);  /* pid: read again at its next mmap */
BPF_RINGBUF_OUTPUT(events, EVENT_PAGES);
#if PYTHON_STACKS
BPF_HASH(python_processes, u32, struct python_process, PYTHON_PROCESSES);
BPF_HASH(python_threads, struct python_thread, u64, PYTHON_THREADS);  /* -> PyThreadState address */
BPF_TABLE("lru_hash", u32, u64, python_searched, PYTHON_THREADS);   /* tid -> when looked for in vain */
BPF_PERCPU_ARRAY(python_scratch, struct python_stack_event, 1);
BPF_HASH(python_stacks_0, u64, struct python_stack, PYTHON_STACK_ENTRIES);
BPF_HASH(python_stacks_1, u64, struct python_stack, PYTHON_STACK_ENTRIES);
BPF_RINGBUF_OUTPUT(python_stack_events, PYTHON_EVENT_PAGES);
#endif
#if OFFCPU
BPF_STACK_TRACE(offcpu_stacks, STACK_ENTRIES);  /* not double-buffered: see struct offcpu_start */
BPF_HASH(offcpu_starts, u32, struct offcpu_start, OFFCPU_THREADS);  /* tid -> how it left */
BPF_PERCPU_ARRAY(offcpu_scratch, struct offcpu_start, 1);
BPF_HASH(block_0, struct sample_key, struct offcpu_value, COUNTS_ENTRIES);
BPF_HASH(block_1, struct sample_key, struct offcpu_value, COUNTS_ENTRIES);
BPF_HASH(wall_0, struct sample_key, struct offcpu_value, COUNTS_ENTRIES);
BPF_HASH(wall_1, struct sample_key, struct offcpu_value, COUNTS_ENTRIES);
BPF_PERCPU_ARRAY(offcpu_stats, u64, OFFCPU_STATS);
#if PYTHON_STACKS
BPF_HASH(offcpu_python_stacks, u64, struct python_stack, PYTHON_STACK_ENTRIES);
#endif
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

/* Whether the collector may hold a snapshot of the process, and so must hear of its exec
 * and exit: one it was told of (seen), or a target named at start. Most short-lived
 * processes are never sampled, and cost the collector nothing. */
static __always_inline int is_known(u32 pid)
{
    return FILTER_PIDS || seen.lookup(&pid) != NULL;
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
#define PYTHON_SEARCH_INTERVAL_NS 10000000ULL  /* a thread not found is looked for again after this */

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

/* The thread state whose thread id is tid, in any interpreter of the process, or 0.
 * The last match wins: a thread state made for a new thread carries its creator's ids
 * until the new thread runs, and thread states are listed newest first. */
static __always_inline u64 find_thread_state(struct python_process *py, u32 tid)
{
    u64 interp = read_pointer(py->runtime, py->runtime_interpreters_head);
    u64 tstate = read_pointer(interp, py->interp_threads_head);
    u64 found = 0;
#pragma clang loop unroll(disable)
    for (u32 i = 0; i < PYTHON_THREAD_SEARCH; i++) {
        if (!tstate) {
            interp = read_pointer(interp, py->interp_next);
            if (!interp)
                break;
            tstate = read_pointer(interp, py->interp_threads_head);
            continue;
        }
        /* <= 3.10 keeps only the pthread_t: the tid is inside the C library's struct. */
        u64 ids = tstate;
        s32 tid_offset = py->tstate_native_thread_id;
        if (tid_offset < 0) {
            ids = read_pointer(tstate, py->tstate_thread_id);
            tid_offset = py->pthread_tid;
        }
        if (tid_offset >= 0 && (u32)read_s32(ids, tid_offset) == tid)
            found = tstate;
        tstate = read_pointer(tstate, py->tstate_next);
    }
    return found;
}

/* The current thread's PyThreadState, or 0. A thread is looked for in the interpreter's
 * thread lists on its first sample and then remembered until it exits. While it is not
 * found, samples look again every PYTHON_SEARCH_INTERVAL_NS (`throttled`); blocking
 * events look every time, since a new thread's first ones come microseconds apart, some
 * before its thread state carries its id. The collector hears of each thread found, to
 * read its name, and of threads it must first learn pthread_tid for. */
static __always_inline u64 python_thread_state(struct python_process *py, u32 pid, u32 tid, int throttled)
{
    struct python_thread thread = {.pid = pid, .tid = tid};
    u64 *known = python_threads.lookup(&thread);
    if (known)
        return *known;
    u64 now = bpf_ktime_get_ns();
    u64 *searched = python_searched.lookup(&tid);
    if (throttled && searched && now - *searched < PYTHON_SEARCH_INTERVAL_NS)
        return 0;
    u64 tstate = find_thread_state(py, tid);
    if (tstate)
        python_threads.update(&thread, &tstate);
    else
        python_searched.update(&tid, &now);
    if (tstate || (py->tstate_native_thread_id < 0 && py->pthread_tid < 0))
        emit(PYTHON_THREAD, pid, tid);
    return tstate;
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

static __always_inline void note_seen(u32 pid, u32 tid)
{
    if (seen.lookup(&pid) == NULL) {
        u8 one = 1;
        seen.update(&pid, &one);
        emit(PROCESS_SEEN, pid, tid);
    }
}

#if PYTHON_STACKS
/* Walks the current thread's Python frames into the per-CPU scratch (*out) and returns
 * the stack's hash; 0 when the thread runs no Python. */
static __always_inline u64 take_python_stack(u32 pid, u32 tid, int throttled, struct python_stack_event **out)
{
    int zero = 0;
    struct python_process *py = python_processes.lookup(&pid);
    struct python_stack_event *python = python_scratch.lookup(&zero);
    *out = python;
    if (!py || !python)
        return 0;
    u64 tstate = python_thread_state(py, pid, tid, throttled);
    return tstate ? walk_python(py, &python->stack, tstate) : 0;
}

/* After a Python stack was inserted into a stack map (`stored`: the insert's result):
 * a new one is sent to the collector at once. Returns the hash to keep in the sample
 * key, 0 if the stack could not be stored. */
static __always_inline u64 kept_python_stack(int stored, struct python_stack_event *python, u32 pid, u64 hash)
{
    if (stored == -EEXIST)
        return hash;
    if (stored != 0) {
        count_loss(LOSS_PYTHON_STACKS_FULL);
        return 0;
    }
    python->pid = pid;
    u32 depth = python->stack.depth;
    if (depth > PYTHON_STACK_DEPTH)
        depth = PYTHON_STACK_DEPTH;
    u32 size = __builtin_offsetof(struct python_stack_event, stack.frames) + depth * sizeof(struct python_frame);
    if (python_stack_events.ringbuf_output(python, size, 0) != 0)
        count_loss(LOSS_PYTHON_EVENTS_FULL);
    return hash;
}
#endif

int on_cpu_sample(void *ctx)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 pid = pid_tgid >> 32;
    u32 tid = (u32)pid_tgid;

    if (pid == 0 || !is_target(pid))  /* pid 0: the idle task */
        return 0;
    note_seen(pid, tid);

    struct sample_key key = {.pid = pid, .tid = tid};
    bpf_get_current_comm(&key.thread_name, sizeof(key.thread_name));

    /* bcc rewrites map calls only where they are written out, not in a macro or
     * through a pointer, so each buffer gets its own lines. */
    int zero_index = 0;
    u32 *buffer = control.lookup(&zero_index);
    u64 zero = 0, *count;
#if PYTHON_STACKS
    struct python_stack_event *python = NULL;
    u64 hash = take_python_stack(pid, tid, 1, &python);
    if (hash && python) {
        int stored;
        if (buffer && *buffer)
            stored = python_stacks_1.insert(&hash, &python->stack);
        else
            stored = python_stacks_0.insert(&hash, &python->stack);
        key.python_stack = kept_python_stack(stored, python, pid, hash);
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

#if OFFCPU
static __always_inline void count_offcpu(int stat)
{
    u64 *n = offcpu_stats.lookup(&stat);
    if (n)
        (*n)++;
}

static __always_inline void add_offcpu(struct offcpu_value *value, u64 delta, int loss)
{
    if (value) {
        __sync_fetch_and_add(&value->count, 1);
        __sync_fetch_and_add(&value->ns, delta);
    } else {
        count_loss(loss);
    }
}

/* Off-CPU time, exactly: when a target thread leaves the CPU, its stacks and the time
 * are kept by tid (threads migrate between CPUs); when it runs again, the time it was
 * away is added to those stacks. The current task here is the one leaving. A task that
 * is still runnable was preempted (or yielded): that counts for wall time, not blocking. */
TRACEPOINT_PROBE(sched, sched_switch)
{
    u64 now = bpf_ktime_get_ns();
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 pid = pid_tgid >> 32;
    u32 tid = (u32)pid_tgid;
    int zero = 0;

    struct offcpu_start *start = offcpu_scratch.lookup(&zero);
    long state = args->prev_state;
    u32 blocked = (state & OFFCPU_BLOCKED_STATES) != 0;
    u32 exiting = (state & OFFCPU_EXIT_STATES) != 0;
    if (start && tid != 0 && (blocked || (OFFCPU_WALL && !exiting)) && is_target(pid)) {
        note_seen(pid, tid);
        if (blocked)
            count_offcpu(OFFCPU_BLOCKED);
        __builtin_memset(&start->key, 0, sizeof(start->key));
        start->start_ns = now;
        start->blocked = blocked;
        start->key.pid = pid;
        start->key.tid = tid;
        bpf_get_current_comm(&start->key.thread_name, sizeof(start->key.thread_name));
        start->key.kernel_stack_id = KERNEL_STACKS ? offcpu_stacks.get_stackid(args, 0) : -EFAULT;
        start->key.user_stack_id = offcpu_stacks.get_stackid(args, BPF_F_USER_STACK);
        count_stack_error(start->key.kernel_stack_id, LOSS_OFFCPU_STACK_COLLISION, LOSS_KERNEL_STACK_FAILED);
        count_stack_error(start->key.user_stack_id, LOSS_OFFCPU_STACK_COLLISION, LOSS_USER_STACK_FAILED);
#if PYTHON_STACKS
        struct python_stack_event *python = NULL;
        u64 hash = take_python_stack(pid, tid, 0, &python);
        if (hash && python)
            start->key.python_stack = kept_python_stack(offcpu_python_stacks.insert(&hash, &python->stack),
                                                        python, pid, hash);
#endif
        if (offcpu_starts.update(&tid, start) != 0)
            count_loss(LOSS_OFFCPU_THREADS_FULL);
    }

    u32 next = args->next_pid;
    struct offcpu_start *away = offcpu_starts.lookup(&next);
    if (away) {
        u64 delta = now - away->start_ns;
        u32 *buffer = control.lookup(&zero);
        struct offcpu_value none = {};
        if (OFFCPU_BLOCK && away->blocked && delta >= MIN_BLOCK_NS) {
            if (buffer && *buffer)
                add_offcpu(block_1.lookup_or_try_init(&away->key, &none), delta, LOSS_BLOCK_FULL);
            else
                add_offcpu(block_0.lookup_or_try_init(&away->key, &none), delta, LOSS_BLOCK_FULL);
        } else if (away->blocked) {
            count_offcpu(OFFCPU_BELOW_MIN);
        }
        if (OFFCPU_WALL) {
            if (buffer && *buffer)
                add_offcpu(wall_1.lookup_or_try_init(&away->key, &none), delta, LOSS_WALL_FULL);
            else
                add_offcpu(wall_0.lookup_or_try_init(&away->key, &none), delta, LOSS_WALL_FULL);
        }
        offcpu_starts.delete(&next);
    }
    return 0;
}
#endif

TRACEPOINT_PROBE(sched, sched_process_exec)
{
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    if (!is_target(pid))
        return 0;
    /* Libraries are mapped after exec: the next sample takes the snapshot (or the next
     * mmap, when the collector finds the loader still at work: maps_pending). */
    int known = is_known(pid);
    seen.delete(&pid);
#if PYTHON_STACKS
    /* Only the thread that called exec is left, running a new image. */
    struct python_thread thread = {.pid = pid, .tid = pid};
    python_threads.delete(&thread);
    python_processes.delete(&pid);
#endif
    if (known)
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
    struct python_thread thread = {.pid = pid, .tid = tid};
    python_threads.delete(&thread);
    python_searched.delete(&tid);
    if (args->group_dead)
        python_processes.delete(&pid);
#endif
    if (args->group_dead) {
        int known = is_known(pid);
        seen.delete(&pid);
        maps_pending.delete(&pid);
        targets.delete(&pid);
        if (known)
            emit(PROCESS_EXIT, pid, tid);
    }
    return 0;
}

/* A process read while the dynamic loader was still mapping its libraries (or a Python
 * executable before its libpython) is read again as soon as it maps something more,
 * rather than at its next sample or block, which may come after it has exited: its
 * library frames get names, and its Python frames start before its own code runs. */
TRACEPOINT_PROBE(syscalls, sys_exit_mmap)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 pid = pid_tgid >> 32;
    if (maps_pending.lookup(&pid) == NULL)
        return 0;
    maps_pending.delete(&pid);
    note_seen(pid, (u32)pid_tgid);
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
