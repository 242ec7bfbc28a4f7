/* The CPython walker: finds a thread's PyThreadState and walks its frames, from the
 * interpreter layout the collector writes into `python_processes` for each process. A
 * stack stored for the first time since a drain is sent to the collector at once, so
 * that it reads the code objects while they still exist. */

BPF_HASH(python_processes, u32, struct python_process, WHEN(PYTHON_STACKS, PYTHON_PROCESSES));
BPF_HASH(python_threads, struct python_thread, u64, WHEN(PYTHON_STACKS, THREAD_ENTRIES));  /* -> PyThreadState address */
BPF_TABLE("lru_hash", u32, u64, python_searched, WHEN(PYTHON_STACKS, THREAD_ENTRIES));   /* tid -> when looked for in vain */
BPF_PERCPU_ARRAY(python_scratch, struct python_stack_event, 1);
BPF_RINGBUF_OUTPUT(python_stack_events, WHEN(PYTHON_STACKS, PYTHON_EVENT_PAGES));

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
    u64 hash = FNV_OFFSET;
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
        hash = fnv_add(fnv_add(hash, code), (u32)f->instr);
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

static __always_inline void forget_python_thread(u32 pid, u32 tid)
{
    struct python_thread thread = {.pid = pid, .tid = tid};
    python_threads.delete(&thread);
    python_searched.delete(&tid);
}
