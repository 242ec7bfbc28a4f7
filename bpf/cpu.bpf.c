/* CPU sampling: on every CPU's perf clock tick, the running thread's kernel, user and
 * Python stacks are counted under one key in the active buffer. (Each pair's array is
 * filled before the perf events are attached: a NULL map is for the verifier.) */

BPF_HASH(counts_0, struct sample_key, u64, SAMPLE_ENTRIES);
BPF_HASH(counts_1, struct sample_key, u64, SAMPLE_ENTRIES);
BPF_ARRAY_OF_MAPS(counts, "counts_0", 2);
BPF_STACK_TRACE(stacks_0, STACK_ENTRIES);
BPF_STACK_TRACE(stacks_1, STACK_ENTRIES);
BPF_ARRAY_OF_MAPS(stacks, "stacks_0", 2);
BPF_HASH(python_stacks_0, u64, struct python_stack, WHEN(PYTHON_STACKS, PYTHON_STACK_ENTRIES));
BPF_HASH(python_stacks_1, u64, struct python_stack, WHEN(PYTHON_STACKS, PYTHON_STACK_ENTRIES));
BPF_ARRAY_OF_MAPS(python_stacks, "python_stacks_0", 2);
BPF_HASH(native_stacks_0, u64, struct native_stack, WHEN(NATIVE_UNWIND, NATIVE_STACK_ENTRIES));
BPF_HASH(native_stacks_1, u64, struct native_stack, WHEN(NATIVE_UNWIND, NATIVE_STACK_ENTRIES));
BPF_ARRAY_OF_MAPS(native_stacks, "native_stacks_0", 2);
BPF_PROG_ARRAY(cpu_unwinder, 1);  /* [0] unwind_cpu_stack, which calls itself */

/* Counts a sample under its key in `count_map` (a map of the buffer's), the user stack
 * being the frame-pointer one unless a native stack was unwound. */
static __always_inline void count_sample(void *ctx, struct sample_key *key, u32 buffer, void *count_map, int full)
{
    void *stack_map = stacks.lookup(&buffer);
    if (!key->native_stack && stack_map) {
        key->user_stack_id = get_stackid(ctx, stack_map, BPF_F_USER_STACK);
        count_stack_error(key->user_stack_id, LOSS_USER_STACK_COLLISION, LOSS_USER_STACK_FAILED);
    }
    u64 zero = 0;
    u64 *count = count_map ? lookup_or_init(count_map, key, &zero) : NULL;
    if (count)
        __sync_fetch_and_add(count, 1);
    else
        count_loss(full);
}

static __always_inline void count_cpu_sample(void *ctx, struct sample_key *key, u32 buffer)
{
    count_sample(ctx, key, buffer, counts.lookup(&buffer), LOSS_COUNTS_FULL);
}

/* The current thread's Python stack, stored in the buffer's map, becomes the key's. */
static __always_inline void take_buffered_python_stack(struct sample_key *key, u32 buffer, int throttled)
{
    if (!PYTHON_STACKS)
        return;
    struct python_stack_event *python = NULL;
    u64 hash = take_python_stack(key->pid, key->tid, throttled, &python);
    void *python_map = python_stacks.lookup(&buffer);
    if (hash && python && python_map)
        key->python_stack = kept_python_stack(bpf_map_update_elem(python_map, &hash, &python->stack, BPF_NOEXIST),
                                              python, key->pid, hash);
}

/* A native stack unwound for a sample, stored in the buffer's map, becomes its key's. */
static __always_inline void keep_buffered_native_stack(struct native_unwind *s)
{
    u64 hash = end_native_unwind(s);
    void *native_map = native_stacks.lookup(&s->buffer);
    if (hash && native_map)
        s->key.native_stack = kept_native_stack(bpf_map_update_elem(native_map, &hash, &s->stack, BPF_NOEXIST), hash);
}

int on_cpu_sample(void *ctx)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 pid = pid_tgid >> 32;
    u32 tid = (u32)pid_tgid;

    if (pid == 0 || !is_target(pid))  /* pid 0: the idle task */
        return 0;
    note_seen(pid, tid);

    struct sample_key key = {.pid = pid, .tid = tid, .kernel_stack_id = -EFAULT, .user_stack_id = -EFAULT};
    bpf_get_current_comm(&key.thread_name, sizeof(key.thread_name));
    u32 buffer = active_buffer();
    take_buffered_python_stack(&key, buffer, 1);
    void *stack_map = stacks.lookup(&buffer);
    if (KERNEL_STACKS && stack_map) {
        key.kernel_stack_id = get_stackid(ctx, stack_map, 0);
        count_stack_error(key.kernel_stack_id, LOSS_KERNEL_STACK_COLLISION, LOSS_KERNEL_STACK_FAILED);
    }
    if (NATIVE_UNWIND && begin_native_unwind(0, &key, buffer))
        cpu_unwinder.call(ctx, 0);  /* does not return unless the call fails */
    count_cpu_sample(ctx, &key, buffer);
    return 0;
}

/* The CPU sampler's native unwinder: some frames per tail call, then the sample. */
int unwind_cpu_stack(void *ctx)
{
    if (!NATIVE_UNWIND)
        return 0;
    int slot = 0;
    struct native_unwind *s = unwind_scratch.lookup(&slot);
    if (!s)
        return 0;
    if (unwind_frames(s)) {
        cpu_unwinder.call(ctx, 0);
        s->stack.end = UNWIND_TRUNCATED;  /* out of tail calls */
    }
    keep_buffered_native_stack(s);
    count_cpu_sample(ctx, &s->key, s->buffer);
    return 0;
}
