/* Off-CPU time, exactly: when a target thread leaves the CPU, its stacks and the time
 * are kept by tid (threads migrate between CPUs); when it runs again, the time it was
 * away is added to those stacks, as blocking delay (block) and off-CPU time of every
 * kind (wall). A task that is still runnable was preempted (or yielded): that counts for
 * wall time, not blocking. A thread's stacks are kept in maps that are not
 * double-buffered, since it may stay away across drains; the collector prunes them. */

BPF_STACK_TRACE(offcpu_stacks, WHEN(OFFCPU, STACK_ENTRIES));
BPF_HASH(offcpu_python_stacks, u64, struct python_stack, WHEN(OFFCPU && PYTHON_STACKS, PYTHON_STACK_ENTRIES));
BPF_HASH(offcpu_native_stacks, u64, struct native_stack, WHEN(OFFCPU && NATIVE_UNWIND, NATIVE_STACK_ENTRIES));
BPF_HASH(offcpu_starts, u32, struct offcpu_start, WHEN(OFFCPU, THREAD_ENTRIES));  /* tid -> how it left */
BPF_HASH(offcpu_late_python, u32, struct offcpu_late_python, WHEN(OFFCPU && PYTHON_STACKS, THREAD_ENTRIES));  /* tid -> its stack, walked late */
BPF_PERCPU_ARRAY(offcpu_scratch, struct offcpu_start, 1);
BPF_HASH(block_0, struct sample_key, struct offcpu_value, WHEN(OFFCPU_BLOCK, SAMPLE_ENTRIES));
BPF_HASH(block_1, struct sample_key, struct offcpu_value, WHEN(OFFCPU_BLOCK, SAMPLE_ENTRIES));
BPF_ARRAY_OF_MAPS(block, "block_0", 2);
BPF_HASH(wall_0, struct sample_key, struct offcpu_value, WHEN(OFFCPU_WALL, SAMPLE_ENTRIES));
BPF_HASH(wall_1, struct sample_key, struct offcpu_value, WHEN(OFFCPU_WALL, SAMPLE_ENTRIES));
BPF_ARRAY_OF_MAPS(wall, "wall_0", 2);
BPF_PERCPU_ARRAY(offcpu_stats, u64, OFFCPU_STATS);
BPF_PROG_ARRAY(offcpu_unwinder, 1);  /* [0] unwind_offcpu_stack, which calls itself */

static __always_inline void count_offcpu(int stat)
{
    u64 *n = offcpu_stats.lookup(&stat);
    if (n)
        (*n)++;
}

/* Whether the collector has put the block and wall maps in their arrays: bcc attaches
 * sched_switch as it loads the program, a moment before. Until then no thread is kept as
 * away, as before the program was loaded, so every time away is added to a map. */
static __always_inline int buffers_ready(void)
{
    int last = 1;
    return block.lookup(&last) != NULL && wall.lookup(&last) != NULL;
}

/* Adds a time away to a stack's value in a block or wall map. */
static __always_inline void add_offcpu(void *map, struct sample_key *key, u64 delta, int loss)
{
    if (!map)  /* not before buffers_ready() */
        return;
    struct offcpu_value none = {};
    struct offcpu_value *value = lookup_or_init(map, key, &none);
    if (value) {
        __sync_fetch_and_add(&value->count, 1);
        __sync_fetch_and_add(&value->ns, delta);
    } else {
        count_loss(loss);
    }
}

/* A thread leaving the CPU, as kept until it runs again: the user stack is the
 * frame-pointer one unless a native stack was unwound. */
static __always_inline void keep_offcpu_start(void *ctx, struct offcpu_start *start)
{
    if (!start->key.native_stack) {
        start->key.user_stack_id = offcpu_stacks.get_stackid(ctx, BPF_F_USER_STACK);
        count_stack_error(start->key.user_stack_id, LOSS_OFFCPU_STACK_COLLISION, LOSS_USER_STACK_FAILED);
    }
    u32 tid = start->key.tid;
    if (offcpu_starts.update(&tid, start) != 0)
        count_loss(LOSS_OFFCPU_THREADS_FULL);
}

/* A thread that left the CPU before its process was read comes back: it takes the
 * Python stack the collector walked for it meanwhile, if walked during this time away. */
static __always_inline void add_late_python_stack(struct offcpu_start *away, u32 tid)
{
    struct offcpu_late_python *late = offcpu_late_python.lookup(&tid);
    if (!late)
        return;
    if (late->start_ns == away->start_ns)
        away->key.python_stack = late->python_stack;
    offcpu_late_python.delete(&tid);
}

/* The thread coming back to the CPU: its time away is added to its stacks. */
static __always_inline void account_return(u32 tid, u64 now)
{
    struct offcpu_start *away = offcpu_starts.lookup(&tid);
    if (!away)
        return;
    u64 delta = now - away->start_ns;
    u32 buffer = active_buffer();
    if (PYTHON_STACKS && !away->key.python_stack)
        add_late_python_stack(away, tid);
    if (OFFCPU_BLOCK && away->blocked && delta >= MIN_BLOCK_NS)
        add_offcpu(block.lookup(&buffer), &away->key, delta, LOSS_BLOCK_FULL);
    else if (away->blocked)
        count_offcpu(OFFCPU_BELOW_MIN);
    if (OFFCPU_WALL)
        add_offcpu(wall.lookup(&buffer), &away->key, delta, LOSS_WALL_FULL);
    offcpu_starts.delete(&tid);
}

/* The thread leaving the CPU (the current task): kept with its stacks, unless it is
 * no target, or neither blocked nor (for wall time) still alive. */
static __always_inline void keep_departure(void *ctx, long state, u64 now)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 pid = pid_tgid >> 32;
    u32 tid = (u32)pid_tgid;
    int zero = 0;
    struct offcpu_start *start = offcpu_scratch.lookup(&zero);
    u32 blocked = (state & OFFCPU_BLOCKED_STATES) != 0;
    u32 exiting = (state & OFFCPU_EXIT_STATES) != 0;
    if (!start || tid == 0 || !is_target(pid) || !buffers_ready())
        return;
    /* A thread leaving the CPU while still kept as away came back with no sched_switch
     * traced for it: its time away is unknown, and counted as lost. */
    if (offcpu_starts.lookup(&tid)) {
        count_loss(LOSS_OFFCPU_RETURN_UNTRACED);
        offcpu_starts.delete(&tid);
    }
    if (!(blocked || (OFFCPU_WALL && !exiting)))
        return;
    note_seen(pid, tid);
    if (blocked)
        count_offcpu(OFFCPU_BLOCKED);
    __builtin_memset(&start->key, 0, sizeof(start->key));
    start->start_ns = now;
    start->blocked = blocked;
    start->key.pid = pid;
    start->key.tid = tid;
    start->key.kernel_stack_id = -EFAULT;
    start->key.user_stack_id = -EFAULT;
    bpf_get_current_comm(&start->key.thread_name, sizeof(start->key.thread_name));
    if (KERNEL_STACKS) {
        start->key.kernel_stack_id = offcpu_stacks.get_stackid(ctx, 0);
        count_stack_error(start->key.kernel_stack_id, LOSS_OFFCPU_STACK_COLLISION, LOSS_KERNEL_STACK_FAILED);
    }
    if (PYTHON_STACKS) {
        struct python_stack_event *python = NULL;
        u64 hash = take_python_stack(pid, tid, 0, &python);
        if (hash && python)
            start->key.python_stack = kept_python_stack(offcpu_python_stacks.insert(&hash, &python->stack),
                                                        python, pid, hash);
    }
    if (NATIVE_UNWIND && begin_native_unwind(1, &start->key, 0))
        offcpu_unwinder.call(ctx, 0);  /* does not return unless the call fails */
    keep_offcpu_start(ctx, start);
}

#if OFFCPU
/* The thread coming in is accounted first: the one leaving may go on to the unwinder. */
TRACEPOINT_PROBE(sched, sched_switch)
{
    u64 now = bpf_ktime_get_ns();
    account_return(args->next_pid, now);
    keep_departure(args, args->prev_state, now);
    return 0;
}
#endif

/* The off-CPU native unwinder: some frames per tail call, then the thread is kept. */
int unwind_offcpu_stack(void *ctx)
{
    if (!(NATIVE_UNWIND && OFFCPU))
        return 0;
    int zero = 0, slot = 1;
    struct native_unwind *s = unwind_scratch.lookup(&slot);
    struct offcpu_start *start = offcpu_scratch.lookup(&zero);
    if (!s || !start)
        return 0;
    if (unwind_frames(s)) {
        offcpu_unwinder.call(ctx, 0);
        s->stack.end = UNWIND_TRUNCATED;
    }
    u64 hash = end_native_unwind(s);
    if (hash)
        start->key.native_stack = kept_native_stack(offcpu_native_stacks.insert(&hash, &s->stack), hash);
    keep_offcpu_start(ctx, start);
    return 0;
}
