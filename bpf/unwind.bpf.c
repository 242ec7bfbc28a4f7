/* The native unwinder: steps through a thread's user stack by the rules of the unwind
 * tables the collector builds from each binary's .eh_frame (frame pointers where a
 * binary has none), a few frames per tail call. The tables live in two arrays the
 * collector writes (see common.h); BPF only reads them. */

BPF_F_TABLE("array", u32, u64, unwind_rows, WHEN(NATIVE_UNWIND, UNWIND_ROWS), BPF_F_MMAPABLE);
BPF_F_TABLE("array", u32, struct unwind_mapping, unwind_mappings, WHEN(NATIVE_UNWIND, UNWIND_MAPPINGS), BPF_F_MMAPABLE);
BPF_HASH(unwind_processes, u32, struct unwind_process, WHEN(NATIVE_UNWIND, THREAD_ENTRIES));
BPF_TABLE("lru_hash", u32, u64, unwind_stale, WHEN(NATIVE_UNWIND, THREAD_ENTRIES));  /* pid -> when it was last asked to be read again */
BPF_PERCPU_ARRAY(unwind_scratch, struct native_unwind, 3);   /* [0] CPU samples, [1] off-CPU, [2] memory and faults */
BPF_PERCPU_ARRAY(unwind_ends, u64, UNWIND_ENDS);

#define UNWIND_STALE_INTERVAL_NS 100000000ULL  /* a process's maps are asked for again at most this often */
#define USER_SPACE_END 0x800000000000ULL

/* The mapping of the process holding pc: a binary search of its run of unwind_mappings. */
static __always_inline struct unwind_mapping *find_mapping(struct unwind_process *proc, u64 pc)
{
    u32 first = proc->first_mapping, lo = first, hi = first + proc->num_mappings;
#pragma clang loop unroll(disable)
    for (int i = 0; i < UNWIND_MAPPING_SEARCH; i++) {
        if (lo >= hi)
            break;
        u32 mid = lo + (hi - lo) / 2;
        struct unwind_mapping *m = unwind_mappings.lookup(&mid);
        if (!m)
            return NULL;
        if (m->start <= pc)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo == first)
        return NULL;
    u32 at = lo - 1;
    struct unwind_mapping *m = unwind_mappings.lookup(&at);
    return m && pc < m->end ? m : NULL;
}

/* The row in force at a binary's virtual address rel (0, CFA_NONE, before its first row). */
static __always_inline u64 find_row(u32 first, u32 num_rows, u64 rel)
{
    u32 lo = first, hi = first + num_rows;
#pragma clang loop unroll(disable)
    for (int i = 0; i < UNWIND_ROW_SEARCH; i++) {
        if (lo >= hi)
            break;
        u32 mid = lo + (hi - lo) / 2;
        u64 *row = unwind_rows.lookup(&mid);
        if (!row)
            return 0;
        if (UNWIND_ROW_PC(*row) <= rel)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo == first)
        return 0;
    u32 at = lo - 1;
    u64 *row = unwind_rows.lookup(&at);
    return row ? *row : 0;
}

static __always_inline u64 read_user_word(u64 address, int *failed)
{
    u64 value = 0;
    if (bpf_probe_read_user(&value, sizeof(value), (void *)address) != 0)
        *failed = 1;
    return value;
}

/* Records the frame s stands in and steps to its caller. Returns 0 when unwinding ends,
 * with the reason in s->stack.end. */
static __always_inline int unwind_frame(struct native_unwind *s, struct unwind_process *proc)
{
    u32 depth = s->stack.depth;
    if (depth >= NATIVE_STACK_DEPTH) {
        s->stack.end = UNWIND_TRUNCATED;
        return 0;
    }
    s->stack.pcs[depth] = s->pc;
    s->stack.depth = depth + 1;
    /* A return address may be past the end of its function (a call to a noreturn
     * function): the call itself is looked up. */
    u64 pc = s->exact ? s->pc : s->pc - 1;
    struct unwind_mapping *m = find_mapping(proc, pc);
    if (!m) {
        s->stack.end = depth == 0 ? UNWIND_FALLBACK : UNWIND_NO_MAPPING;
        return 0;
    }
    u64 row = 0;
    if (m->num_rows && pc - m->bias <= 0xFFFFFFFFULL)
        row = find_row(m->first_row, m->num_rows, pc - m->bias);
    u32 kind = UNWIND_ROW_KIND(row);
    u64 cfa, bp = s->bp;
    int failed = 0;
    if (kind == CFA_SIGNAL) {  /* the kernel's signal frame: the interrupted code's registers */
        u64 frame = s->sp;
        s->pc = read_user_word(frame + SIGNAL_FRAME_RIP, &failed);
        s->sp = read_user_word(frame + SIGNAL_FRAME_RSP, &failed);
        s->bp = read_user_word(frame + SIGNAL_FRAME_RBP, &failed);
        s->exact = 1;
        s->from_table = 1;
        s->stack.end = failed ? UNWIND_READ_FAILED : UNWIND_COMPLETE;
        return !failed && s->pc;
    }
    if (kind == CFA_NONE) {  /* no unwind information here: frame pointers */
        if (!bp || bp < s->sp) {
            s->stack.end = UNWIND_FRAME_POINTER_END;
            return 0;
        }
        cfa = bp + 16;
        bp = read_user_word(bp, &failed);
    } else if (kind == CFA_RSP) {
        cfa = s->sp + UNWIND_ROW_CFA_OFFSET(row);
    } else if (kind == CFA_RBP) {
        if (!bp) {
            s->stack.end = UNWIND_RBP_LOST;
            return 0;
        }
        cfa = bp + UNWIND_ROW_CFA_OFFSET(row);
    } else if (kind == CFA_PLT) {
        u8 threshold = (u8)UNWIND_ROW_RBP(row);
        cfa = s->sp + UNWIND_ROW_CFA_OFFSET(row) + ((s->pc & 15) >= threshold ? 8 : 0);
    } else if (kind == CFA_END) {
        s->stack.end = UNWIND_COMPLETE;
        return 0;
    } else {
        s->stack.end = UNWIND_UNSUPPORTED_RULE;
        return 0;
    }
    u64 ra = read_user_word(cfa - 8, &failed);
    if (kind == CFA_RSP || kind == CFA_RBP) {
        s8 rule = UNWIND_ROW_RBP(row);
        if (rule == RBP_OTHER)
            bp = 0;
        else if (rule)
            bp = read_user_word(cfa + 8 * (s64)rule, &failed);
    }
    if (failed) {
        s->stack.end = UNWIND_READ_FAILED;
        return 0;
    }
    s->pc = ra;
    s->sp = cfa;
    s->bp = bp;
    s->exact = 0;
    s->from_table = kind != CFA_NONE;
    if (!ra) {
        s->stack.end = UNWIND_COMPLETE;
        return 0;
    }
    return 1;
}

/* Sets up the per-CPU unwind of the current thread's user stack (scratch slot `slot`)
 * from the registers it left user space with; NULL when the process has no unwind
 * mappings (not read yet, or a kernel thread): then frame pointers are followed. */
static __always_inline struct native_unwind *begin_native_unwind(int slot, struct sample_key *key, u32 buffer)
{
    u32 pid = key->pid;
    if (unwind_processes.lookup(&pid) == NULL)
        return NULL;
    struct native_unwind *s = unwind_scratch.lookup(&slot);
    if (!s)
        return NULL;
    struct user_regs *regs = (struct user_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
    s->pc = s->sp = s->bp = 0;
    bpf_probe_read_kernel(&s->pc, sizeof(s->pc), &regs->ip);
    bpf_probe_read_kernel(&s->sp, sizeof(s->sp), &regs->sp);
    bpf_probe_read_kernel(&s->bp, sizeof(s->bp), &regs->bp);
    s->exact = 1;
    s->from_table = 1;
    s->buffer = buffer;
    s->key = *key;
    s->stack.depth = 0;
    s->stack.end = UNWIND_COMPLETE;
    return s;
}

/* Unwinds UNWIND_FRAMES_PER_PROGRAM frames; returns 1 if there are more. */
static __always_inline int unwind_frames(struct native_unwind *s)
{
    u32 pid = s->key.pid;
    struct unwind_process *proc = unwind_processes.lookup(&pid);
    if (!proc) {
        s->stack.end = UNWIND_NO_MAPPING;
        return 0;
    }
#pragma clang loop unroll(disable)
    for (int i = 0; i < UNWIND_FRAMES_PER_PROGRAM; i++) {
        if (!unwind_frame(s, proc))
            return 0;
    }
    return 1;
}

static __always_inline u64 native_stack_hash(struct native_stack *stack)
{
    u64 hash = FNV_OFFSET;
#pragma clang loop unroll(disable)
    for (u32 i = 0; i < NATIVE_STACK_DEPTH; i++) {
        if (i >= stack->depth)
            break;
        hash = fnv_add(hash, stack->pcs[i]);
    }
    return hash | 1;
}

/* An unwinding that ended: counts why, asks for the process's maps again when an
 * address that ought to be mapped (where the thread is, or a return address an unwind
 * table led to: not one that frame pointers made up) was in none of them, and returns
 * the key of the stack to store (0: none, the frame-pointer stack stands in). */
static __always_inline u64 end_native_unwind(struct native_unwind *s)
{
    u32 end = s->stack.end;
    u64 *n = unwind_ends.lookup(&end);
    if (n)
        (*n)++;
    if ((end == UNWIND_NO_MAPPING || end == UNWIND_FALLBACK) && s->from_table && s->pc < USER_SPACE_END) {
        u32 pid = s->key.pid;
        u64 now = bpf_ktime_get_ns();
        u64 *last = unwind_stale.lookup(&pid);
        if (!last || now - *last >= UNWIND_STALE_INTERVAL_NS) {
            unwind_stale.update(&pid, &now);
            seen.delete(&pid);
            note_seen(pid, s->key.tid);
        }
    }
    if (end == UNWIND_FALLBACK)
        return 0;
    return native_stack_hash(&s->stack);
}

/* A stored native stack's key for the sample, 0 if the map is full. */
static __always_inline u64 kept_native_stack(int stored, u64 hash)
{
    if (stored == 0 || stored == -EEXIST)
        return hash;
    count_loss(LOSS_NATIVE_STACKS_FULL);
    return 0;
}
