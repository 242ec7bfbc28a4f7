/* Memory as the kernel hands it out. The anonymous ranges a target process obtains (an
 * mmap, brk or mremap growth, part of a PROT_NONE reservation made accessible) are kept
 * by address with the stacks of the thread that obtained them until they are unmapped,
 * and each is counted as an allocation; what a process holds is the sum of its ranges,
 * which the collector reads. A sampled share of the user page faults on pages not yet
 * present is counted with the faulting thread's stacks: where resident memory grows.
 *
 * A range may be held for the whole recording, so its stacks are kept in maps that are
 * not double-buffered; the collector prunes them. The calls are followed at syscall
 * tracepoints; mmap's and mprotect's are lifecycle.bpf.c's, which calls in here. */

BPF_HASH(memory_ranges, struct memory_range_key, struct memory_range, WHEN(MEMORY, MEMORY_RANGES));
BPF_HASH(memory_range_ends, struct memory_range_key, u64, WHEN(MEMORY, MEMORY_RANGES));  /* (pid, end) -> start */
BPF_HASH(memory_processes, u32, struct memory_process, WHEN(MEMORY, THREAD_ENTRIES));
BPF_HASH(memory_calls, u32, struct memory_call, WHEN(MEMORY, THREAD_ENTRIES));  /* tid -> its mmap or mremap */
BPF_HASH(memory_brk, u32, u64, WHEN(MEMORY, THREAD_ENTRIES));  /* pid -> its program break, as last returned */
BPF_HASH(memory_holes, struct memory_range_key, struct memory_hole, WHEN(MEMORY, MEMORY_HOLE_ENTRIES));
BPF_STACK_TRACE(memory_stacks, WHEN(MEMORY, STACK_ENTRIES));
BPF_HASH(memory_python_stacks, u64, struct python_stack, WHEN(MEMORY && PYTHON_STACKS, PYTHON_STACK_ENTRIES));
BPF_HASH(memory_native_stacks, u64, struct native_stack, WHEN(MEMORY && NATIVE_UNWIND, NATIVE_STACK_ENTRIES));
BPF_HASH(alloc_0, struct sample_key, struct memory_value, WHEN(MEMORY, SAMPLE_ENTRIES));
BPF_HASH(alloc_1, struct sample_key, struct memory_value, WHEN(MEMORY, SAMPLE_ENTRIES));
BPF_ARRAY_OF_MAPS(alloc, "alloc_0", 2);
BPF_HASH(faults_0, struct sample_key, u64, WHEN(FAULTS, SAMPLE_ENTRIES));
BPF_HASH(faults_1, struct sample_key, u64, WHEN(FAULTS, SAMPLE_ENTRIES));
BPF_ARRAY_OF_MAPS(faults, "faults_0", 2);
BPF_PERCPU_ARRAY(memory_scratch, struct memory_obtain, 1);
BPF_PERCPU_ARRAY(memory_stats, u64, MEMORY_STATS);
BPF_PROG_ARRAY(memory_unwinder, 1);  /* [0] unwind_memory_stack, which calls itself */
BPF_PROG_ARRAY(fault_unwinder, 1);   /* [0] unwind_fault_stack, which calls itself */

#define MEMORY_UNWIND_SLOT 2     /* in unwind_scratch: tracepoint programs do not nest on a CPU */
#define MEMORY_UNMAP_STEPS 16    /* ranges an unmapping walks in BPF; the rest goes to the collector */
#define MAP_FIXED_BIT 0x10       /* mmap(2) flags */
#define MAP_ANONYMOUS_BIT 0x20
#define FAULT_PRESENT_BIT 1      /* x86 page fault error code: the page was present (a protection fault) */
#define ERRNO_MAX 4095           /* a syscall's return in [-4095, -1] is an error */

static __always_inline u64 page_end(u64 address)
{
    return (address + 4095) & ~4095ULL;
}

static __always_inline void add_memory_stat(int stat, u64 n)
{
    u64 *value = memory_stats.lookup(&stat);
    if (value)
        *value += n;
}

static __always_inline int failed(long ret)
{
    return ret < 0 && ret >= -ERRNO_MAX;
}

/* The generation of the process's image, its entry made with its first range; 0 when
 * the map of processes is full. */
static __always_inline u64 memory_generation(u32 pid)
{
    struct memory_process *process = memory_processes.lookup(&pid);
    if (!process) {
        struct memory_process fresh = {.generation = bpf_ktime_get_ns()};
        memory_processes.insert(&pid, &fresh);
        process = memory_processes.lookup(&pid);
    }
    return process ? process->generation : 0;
}

/* The collector reads a process (its binaries, to name its stacks) once it has obtained
 * MEMORY_READ_BYTES: not the many short processes that only map a few pages as they start. */
static __always_inline void note_obtained(u32 pid, u32 tid, u64 bytes)
{
    struct memory_process *process = memory_processes.lookup(&pid);
    if (process && __sync_fetch_and_add(&process->obtained, bytes) + bytes >= MEMORY_READ_BYTES)
        note_seen(pid, tid);
}

static __always_inline void count_ranges(u32 pid, s64 n)
{
    struct memory_process *process = memory_processes.lookup(&pid);
    if (process)
        __sync_fetch_and_add(&process->ranges, n);
}

/* Drops the index entry of a range's end, if it is that range's. */
static __always_inline void unindex_end(u32 pid, u64 start, u64 end)
{
    struct memory_range_key end_key = {.pid = pid, .start = end};
    u64 *indexed = memory_range_ends.lookup(&end_key);
    if (indexed && *indexed == start)
        memory_range_ends.delete(&end_key);
}

static __always_inline void insert_range(u32 pid, u64 start, struct memory_range *range)
{
    struct memory_range_key key = {.pid = pid, .start = start};
    struct memory_range_key end = {.pid = pid, .start = range->end};
    struct memory_range *replaced = memory_ranges.lookup(&key);  /* one whose unmapping was not seen */
    int existed = replaced != NULL;
    if (replaced && replaced->end != range->end)
        unindex_end(pid, start, replaced->end);
    if (memory_ranges.update(&key, range) != 0 || memory_range_ends.update(&end, &start) != 0) {
        count_loss(LOSS_MEMORY_RANGES_FULL);
        return;
    }
    if (!existed)
        count_ranges(pid, 1);
}

static __always_inline void remove_range(u32 pid, u64 start, u64 end)
{
    struct memory_range_key key = {.pid = pid, .start = start};
    if (memory_ranges.delete(&key) == 0)
        count_ranges(pid, -1);
    unindex_end(pid, start, end);
}

/* The range that ends at `end`, through the index of ends (an entry whose range has
 * changed since is stale, and goes). */
static __always_inline struct memory_range *range_ending(u32 pid, u64 end, u64 *start)
{
    struct memory_range_key end_key = {.pid = pid, .start = end};
    u64 *indexed = memory_range_ends.lookup(&end_key);
    if (!indexed)
        return NULL;
    struct memory_range_key key = {.pid = pid, .start = *indexed};
    struct memory_range *range = memory_ranges.lookup(&key);
    if (!range || range->end != end) {
        memory_range_ends.delete(&end_key);
        return NULL;
    }
    *start = key.start;
    return range;
}

/* An unmapping BPF could not follow, for the collector, if the process holds ranges at
 * all (else it is memory that was not followed). */
static __always_inline void note_hole(u32 pid, u64 start, u64 end)
{
    struct memory_process *process = memory_processes.lookup(&pid);
    if (!process || process->ranges <= 0)
        return;
    struct memory_range_key key = {.pid = pid, .start = start};
    struct memory_hole hole = {.end = end, .since_ns = bpf_ktime_get_ns()};
    if (memory_holes.update(&key, &hole) != 0)
        count_loss(LOSS_MEMORY_HOLES_FULL);
    else
        add_memory_stat(MEMORY_HOLES, 1);
}

/* [a, b) is unmapped: the ranges it covers go, and those it cuts lose their head or
 * tail. A range is found by its start from a or by its end from b; what neither finds
 * (a hole inside a range, or memory not followed) is noted for the collector if `holes`. */
static __always_inline void unmap_range(u32 pid, u64 a, u64 b, int holes)
{
    int step;
#pragma clang loop unroll(disable)
    for (step = 0; step < MEMORY_UNMAP_STEPS && a < b; step++) {
        struct memory_range_key key = {.pid = pid, .start = a};
        struct memory_range *range = memory_ranges.lookup(&key);
        if (range) {
            u64 end = range->end;
            if (end <= b) {
                remove_range(pid, a, end);
                a = end;
                continue;
            }
            struct memory_range rest = *range;  /* its head is unmapped: the rest starts at b */
            remove_range(pid, a, end);
            insert_range(pid, b, &rest);
            return;
        }
        u64 start = 0;
        range = range_ending(pid, b, &start);
        if (!range)
            break;
        if (start >= a) {
            remove_range(pid, start, b);
            b = start;
            continue;
        }
        struct memory_range rest = *range;  /* its tail is unmapped: the rest ends at a */
        remove_range(pid, start, b);
        rest.end = a;
        insert_range(pid, start, &rest);
        return;
    }
    if (a >= b)
        return;
    if (step == MEMORY_UNMAP_STEPS)
        add_memory_stat(MEMORY_LONG_UNMAPS, 1);
    if (holes)
        note_hole(pid, a, b);
}

/* Keeps the range being obtained (its stacks taken) and counts it as an allocation. */
static __always_inline void keep_obtained(void *ctx, struct memory_obtain *obtained)
{
    if (!obtained->key.native_stack) {
        obtained->key.user_stack_id = memory_stacks.get_stackid(ctx, BPF_F_USER_STACK);
        count_stack_error(obtained->key.user_stack_id, LOSS_MEMORY_STACK_COLLISION, LOSS_USER_STACK_FAILED);
    }
    u32 pid = obtained->key.pid;
    struct memory_range range = {.end = obtained->end, .generation = memory_generation(pid),
                                 .since_ns = bpf_ktime_get_ns(), .key = obtained->key};
    if (!range.generation) {
        count_loss(LOSS_MEMORY_RANGES_FULL);
        return;
    }
    insert_range(pid, obtained->start, &range);
    note_obtained(pid, obtained->key.tid, obtained->end - obtained->start);
    u32 buffer = active_buffer();
    void *map = alloc.lookup(&buffer);
    if (!map)  /* not before the collector has put the maps in their array */
        return;
    struct memory_value none = {};
    struct memory_value *value = lookup_or_init(map, &obtained->key, &none);
    if (value) {
        __sync_fetch_and_add(&value->count, 1);
        __sync_fetch_and_add(&value->bytes, obtained->end - obtained->start);
    } else {
        count_loss(LOSS_ALLOC_FULL);
    }
}

/* The current thread obtained [start, end): it is kept with the thread's stacks, the
 * native one unwound through tail calls when the process has unwind tables. */
static __always_inline void obtain(void *ctx, u32 pid, u32 tid, u64 start, u64 end)
{
    int zero = 0;
    struct memory_obtain *obtained = memory_scratch.lookup(&zero);
    if (!obtained || start >= end)
        return;
    obtained->start = start;
    obtained->end = end;
    __builtin_memset(&obtained->key, 0, sizeof(obtained->key));
    obtained->key.pid = pid;
    obtained->key.tid = tid;
    obtained->key.kernel_stack_id = -EFAULT;  /* a memory call's kernel stack is the syscall's entry */
    obtained->key.user_stack_id = -EFAULT;
    bpf_get_current_comm(&obtained->key.thread_name, sizeof(obtained->key.thread_name));
    if (PYTHON_STACKS) {
        struct python_stack_event *python = NULL;
        u64 hash = take_python_stack(pid, tid, 0, &python);
        if (hash && python)
            obtained->key.python_stack = kept_python_stack(memory_python_stacks.insert(&hash, &python->stack),
                                                           python, pid, hash);
    }
    if (NATIVE_UNWIND && begin_native_unwind(MEMORY_UNWIND_SLOT, &obtained->key, 0))
        memory_unwinder.call(ctx, 0);  /* does not return unless the call fails */
    keep_obtained(ctx, obtained);
}

/* Address space reserved with PROT_NONE: not in use, kept to see it made accessible. */
static __always_inline void reserve(u32 pid, u64 start, u64 end)
{
    struct memory_range range = {.end = end, .generation = memory_generation(pid),
                                 .since_ns = bpf_ktime_get_ns(), .flags = MEMORY_RESERVED};
    range.key.pid = pid;
    if (range.generation)
        insert_range(pid, start, &range);
}

static __always_inline u32 memory_target(u32 *tid)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 pid = pid_tgid >> 32;
    *tid = (u32)pid_tgid;
    return MEMORY && pid && is_target(pid) ? pid : 0;
}

static __always_inline void memory_mmap_enter(u64 addr, u64 len, u64 prot, u64 flags)
{
    u32 tid;
    if (!memory_target(&tid) || !(flags & (MAP_ANONYMOUS_BIT | MAP_FIXED_BIT)))
        return;
    struct memory_call call = {.kind = MEMORY_CALL_MMAP, .addr = addr, .len = page_end(len), .flags = flags,
                               .prot = prot};
    if (memory_calls.update(&tid, &call) != 0)
        count_loss(LOSS_MEMORY_CALLS_FULL);
}

/* The call a thread entered, taken out of memory_calls; 0 if there is none of that kind. */
static __always_inline int take_call(u32 tid, u32 kind, struct memory_call *call)
{
    struct memory_call *entered = memory_calls.lookup(&tid);
    if (!entered || entered->kind != kind)
        return 0;
    *call = *entered;
    memory_calls.delete(&tid);
    return 1;
}

/* A mapped range: what was mapped there before (MAP_FIXED) is gone; anonymous memory
 * is obtained, or only reserved when it cannot be accessed. */
static __always_inline void memory_mmap_exit(void *ctx, long ret)
{
    u32 tid, pid = memory_target(&tid);
    struct memory_call call;
    if (!pid || !take_call(tid, MEMORY_CALL_MMAP, &call) || failed(ret))
        return;
    u64 start = ret, end = start + call.len;
    /* What MAP_FIXED maps over goes; in the middle of a range it is nearly always a
     * reservation being used (by the loader, by a runtime), which holds nothing. */
    if (call.flags & MAP_FIXED_BIT)
        unmap_range(pid, start, end, 0);
    if (!(call.flags & MAP_ANONYMOUS_BIT))
        return;
    if (call.prot == 0)
        reserve(pid, start, end);
    else
        obtain(ctx, pid, tid, start, end);
}

/* Part of a reservation made accessible, at its start or up to its end (how allocators
 * grow a heap, and how thread stacks are set up behind a guard page), is obtained. */
static __always_inline void memory_mprotect(void *ctx, u64 addr, u64 len, u64 prot)
{
    u32 tid, pid = memory_target(&tid);
    if (!pid || prot == 0)
        return;
    u64 a = addr, b = page_end(addr + len), start = addr;
    struct memory_range_key key = {.pid = pid, .start = addr};
    struct memory_range *range = memory_ranges.lookup(&key);
    if (!range)
        range = range_ending(pid, b, &start);
    if (!range || !(range->flags & MEMORY_RESERVED))
        return;
    struct memory_range rest = *range;
    u64 end = range->end;
    if (b > end)
        b = end;
    remove_range(pid, start, end);
    if (start < a) {
        rest.end = a;
        insert_range(pid, start, &rest);
    } else if (b < end) {
        insert_range(pid, b, &rest);
    }
    obtain(ctx, pid, tid, a, b);
}

/* Ranges starting at a, up to b, move to `to` with their stacks (mremap). */
static __always_inline void move_ranges(u32 pid, u64 a, u64 b, u64 to)
{
    u64 delta = to - a;
#pragma clang loop unroll(disable)
    for (int step = 0; step < MEMORY_UNMAP_STEPS && a < b; step++) {
        struct memory_range_key key = {.pid = pid, .start = a};
        struct memory_range *range = memory_ranges.lookup(&key);
        if (!range)
            return;
        struct memory_range moved = *range;
        u64 end = range->end, piece = end < b ? end : b;
        remove_range(pid, a, end);
        if (piece < end)
            insert_range(pid, piece, &moved);  /* the part not moved stays */
        moved.end = piece + delta;
        insert_range(pid, a + delta, &moved);
        a = piece;
    }
}

/* Memory a process's image held goes with the image (exit or exec): its ranges are left
 * for the collector to count as held at the end and remove. */
static __always_inline void memory_image_ended(u32 pid)
{
    if (!MEMORY)
        return;
    struct memory_process *process = memory_processes.lookup(&pid);
    if (process) {
        add_memory_stat(MEMORY_RANGES_LEFT, process->ranges > 0 ? process->ranges : 0);
        memory_processes.delete(&pid);
    }
    memory_brk.delete(&pid);
}

static __always_inline void memory_thread_ended(u32 tid)
{
    if (MEMORY)
        memory_calls.delete(&tid);
}

int unwind_memory_stack(void *ctx)
{
    if (!(NATIVE_UNWIND && MEMORY))
        return 0;
    int zero = 0, slot = MEMORY_UNWIND_SLOT;
    struct native_unwind *s = unwind_scratch.lookup(&slot);
    struct memory_obtain *obtained = memory_scratch.lookup(&zero);
    if (!s || !obtained)
        return 0;
    if (unwind_frames(s)) {
        memory_unwinder.call(ctx, 0);
        s->stack.end = UNWIND_TRUNCATED;
    }
    u64 hash = end_native_unwind(s);
    if (hash)
        obtained->key.native_stack = kept_native_stack(memory_native_stacks.insert(&hash, &s->stack), hash);
    keep_obtained(ctx, obtained);
    return 0;
}

#if MEMORY
TRACEPOINT_PROBE(syscalls, sys_enter_munmap)
{
    u32 tid, pid = memory_target(&tid);
    if (pid)
        unmap_range(pid, args->addr, page_end(args->addr + args->len), 1);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_mremap)
{
    u32 tid;
    if (!memory_target(&tid))
        return 0;
    struct memory_call call = {.kind = MEMORY_CALL_MREMAP, .addr = args->addr, .len = page_end(args->old_len),
                               .new_len = page_end(args->new_len)};
    if (memory_calls.update(&tid, &call) != 0)
        count_loss(LOSS_MEMORY_CALLS_FULL);
    return 0;
}

/* A remapped range moves with its stacks; growth is obtained by the caller, shrinking
 * unmaps the tail. */
TRACEPOINT_PROBE(syscalls, sys_exit_mremap)
{
    u32 tid, pid = memory_target(&tid);
    struct memory_call call;
    if (!pid || !take_call(tid, MEMORY_CALL_MREMAP, &call) || failed(args->ret))
        return 0;
    u64 to = args->ret;
    if (to != call.addr)
        move_ranges(pid, call.addr, call.addr + call.len, to);
    if (call.new_len < call.len)
        unmap_range(pid, to + call.new_len, to + call.len, 1);
    else
        obtain(args, pid, tid, to + call.len, to + call.new_len);
    return 0;
}

/* The program break moved: growth is obtained, shrinking unmaps. A process's break is
 * known from its first brk call on. */
TRACEPOINT_PROBE(syscalls, sys_exit_brk)
{
    u32 tid, pid = memory_target(&tid);
    if (!pid || failed(args->ret))
        return 0;
    u64 now = args->ret;
    u64 *last = memory_brk.lookup(&pid);
    u64 before = last ? *last : 0;
    memory_brk.update(&pid, &now);
    if (!before || now == before)
        return 0;
    if (now < before)
        unmap_range(pid, now, before, 1);
    else
        obtain(args, pid, tid, before, now);
    return 0;
}

/* The OOM killer chose a target: the collector writes what it holds at once. */
TRACEPOINT_PROBE(oom, mark_victim)
{
    u32 pid = args->pid;
    if (is_target(pid) && memory_processes.lookup(&pid))
        emit(OOM_VICTIM, pid, pid);
    return 0;
}
#endif

/* Page faults: the faulting thread's stacks, sampled 1 in FAULT_PERIOD at random, are
 * counted like a CPU sample (in the double-buffered stack maps). */
static __always_inline void count_fault(void *ctx, struct sample_key *key, u32 buffer)
{
    count_sample(ctx, key, buffer, faults.lookup(&buffer), LOSS_FAULTS_FULL);
}

/* A fault on a page not yet present, in user memory, by the current thread: in user
 * mode, or in the kernel on its behalf (a read(2) into a fresh buffer), which then has
 * its kernel stack too. */
static __always_inline void on_fault(void *ctx, u64 address, u64 error_code, int in_kernel)
{
    if ((error_code & FAULT_PRESENT_BIT) || address >= USER_SPACE_END ||
        bpf_get_prandom_u32() % FAULT_PERIOD != 0)
        return;
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 pid = pid_tgid >> 32;
    u32 tid = (u32)pid_tgid;
    u32 buffer = active_buffer();
    void *stack_map = stacks.lookup(&buffer);
    if (pid == 0 || !is_target(pid) || !faults.lookup(&buffer) || !stack_map)  /* no map: not put in yet */
        return;
    note_seen(pid, tid);
    struct sample_key key = {.pid = pid, .tid = tid, .kernel_stack_id = -EFAULT, .user_stack_id = -EFAULT};
    bpf_get_current_comm(&key.thread_name, sizeof(key.thread_name));
    if (in_kernel && KERNEL_STACKS) {
        key.kernel_stack_id = get_stackid(ctx, stack_map, 0);
        count_stack_error(key.kernel_stack_id, LOSS_KERNEL_STACK_COLLISION, LOSS_KERNEL_STACK_FAILED);
    }
    take_buffered_python_stack(&key, buffer, 0);
    if (NATIVE_UNWIND && begin_native_unwind(MEMORY_UNWIND_SLOT, &key, buffer))
        fault_unwinder.call(ctx, 0);  /* does not return unless the call fails */
    count_fault(ctx, &key, buffer);
}

#if FAULTS
TRACEPOINT_PROBE(exceptions, page_fault_user)
{
    on_fault(args, args->address, args->error_code, 0);
    return 0;
}

TRACEPOINT_PROBE(exceptions, page_fault_kernel)
{
    on_fault(args, args->address, args->error_code, 1);
    return 0;
}
#endif

int unwind_fault_stack(void *ctx)
{
    if (!(NATIVE_UNWIND && FAULTS))
        return 0;
    int slot = MEMORY_UNWIND_SLOT;
    struct native_unwind *s = unwind_scratch.lookup(&slot);
    if (!s)
        return 0;
    if (unwind_frames(s)) {
        fault_unwinder.call(ctx, 0);
        s->stack.end = UNWIND_TRUNCATED;
    }
    keep_buffered_native_stack(s);
    count_fault(ctx, &s->key, s->buffer);
    return 0;
}
