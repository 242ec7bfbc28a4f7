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
 *   NATIVE_UNWIND   unwind user stacks from the collector's unwind tables (frame pointers
 *                   where a process has none yet); UNWIND_ROWS, UNWIND_MAPPINGS,
 *                   NATIVE_STACK_ENTRIES size its maps, UNWIND_FRAMES_PER_PROGRAM frames
 *                   are unwound by each of the unwinder's tail calls
 *
 * Double buffering: `control[0]` names the buffer samples go to. The collector flips it,
 * lets in-flight samples finish, then drains and clears the other buffer, so no sample
 * is lost between reading a map and clearing it.
 */
/* Only errno: the perf context is passed through as `void *`, because including
 * bpf_perf_event.h pulls in headers that make bcc's compile five times slower. */
#include <uapi/asm-generic/errno-base.h>
#include "profile.h"

#define PROT_EXEC_BIT 0x4  /* PROT_EXEC of mmap(2) and mprotect(2) */

BPF_ARRAY(control, u32, 1);
BPF_HASH(counts_0, struct sample_key, u64, COUNTS_ENTRIES);
BPF_HASH(counts_1, struct sample_key, u64, COUNTS_ENTRIES);
BPF_STACK_TRACE(stacks_0, STACK_ENTRIES);
BPF_STACK_TRACE(stacks_1, STACK_ENTRIES);
BPF_PERCPU_ARRAY(losses, u64, LOSS_REASONS);
BPF_HASH(targets, u32, u8, TARGET_ENTRIES);
BPF_TABLE("lru_hash", u32, u8, seen, SEEN_ENTRIES);
BPF_TABLE("lru_hash", u32, u8, maps_pending, SEEN_ENTRIES);  /* pid: read again at its next mmap */
BPF_TABLE("lru_hash", u32, u8, code_mapped, SEEN_ENTRIES);   /* pid: mapped code since the collector last asked */
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
BPF_HASH(offcpu_late_python, u32, struct offcpu_late_python, PYTHON_THREADS);  /* tid -> its stack, walked late */
#endif
#endif
#if NATIVE_UNWIND
BPF_F_TABLE("array", u32, u64, unwind_rows, UNWIND_ROWS, BPF_F_MMAPABLE);
BPF_F_TABLE("array", u32, struct unwind_mapping, unwind_mappings, UNWIND_MAPPINGS, BPF_F_MMAPABLE);
BPF_HASH(unwind_processes, u32, struct unwind_process, TARGET_ENTRIES);
BPF_TABLE("lru_hash", u32, u64, unwind_stale, SEEN_ENTRIES);  /* pid -> when it was last asked to be read again */
BPF_PERCPU_ARRAY(unwind_scratch, struct native_unwind, 2);   /* [0] CPU samples, [1] off-CPU */
BPF_PERCPU_ARRAY(unwind_ends, u64, UNWIND_ENDS);
BPF_HASH(native_stacks_0, u64, struct native_stack, NATIVE_STACK_ENTRIES);
BPF_HASH(native_stacks_1, u64, struct native_stack, NATIVE_STACK_ENTRIES);
BPF_PROG_ARRAY(cpu_unwinder, 1);     /* [0] unwind_cpu_stack, which calls itself */
#if OFFCPU
BPF_HASH(offcpu_native_stacks, u64, struct native_stack, NATIVE_STACK_ENTRIES);  /* as offcpu_stacks */
BPF_PROG_ARRAY(offcpu_unwinder, 1);  /* [0] unwind_offcpu_stack */
#endif
#endif

static __always_inline u64 fnv_add(u64 hash, u64 word)
{
    return (hash ^ word) * FNV_PRIME;
}

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
 * and exit: one it was told of (seen), one it asked to be told of again (maps_pending:
 * its seen entry was dropped for that), or a target named at start. Most short-lived
 * processes are never sampled, and cost the collector nothing. */
static __always_inline int is_known(u32 pid)
{
    return FILTER_PIDS || seen.lookup(&pid) != NULL || maps_pending.lookup(&pid) != NULL;
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
#endif

static __always_inline void note_seen(u32 pid, u32 tid)
{
    if (seen.lookup(&pid) == NULL) {
        u8 one = 1;
        seen.update(&pid, &one);
        emit(PROCESS_SEEN, pid, tid);
    }
}

#if NATIVE_UNWIND
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
 * table led to: not one that frame pointers made up) was in none of them, and returns the key of the stack to store (0: none, the
 * frame-pointer stack stands in). */
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
#endif

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

/* Counts a CPU sample under its key, whose user stack is the frame-pointer one unless a
 * native stack was unwound. */
static __always_inline void count_cpu_sample(void *ctx, struct sample_key *key, u32 buffer)
{
    /* bcc rewrites map calls only where they are written out, not in a macro or
     * through a pointer, so each buffer gets its own lines. */
    u64 zero = 0, *count;
    if (buffer) {
        if (!key->native_stack)
            key->user_stack_id = stacks_1.get_stackid(ctx, BPF_F_USER_STACK);
        count = counts_1.lookup_or_try_init(key, &zero);
    } else {
        if (!key->native_stack)
            key->user_stack_id = stacks_0.get_stackid(ctx, BPF_F_USER_STACK);
        count = counts_0.lookup_or_try_init(key, &zero);
    }
    if (count)
        __sync_fetch_and_add(count, 1);
    else
        count_loss(LOSS_COUNTS_FULL);
    if (!key->native_stack)
        count_stack_error(key->user_stack_id, LOSS_USER_STACK_COLLISION, LOSS_USER_STACK_FAILED);
}

int on_cpu_sample(void *ctx)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 pid = pid_tgid >> 32;
    u32 tid = (u32)pid_tgid;

    if (pid == 0 || !is_target(pid))  /* pid 0: the idle task */
        return 0;
    note_seen(pid, tid);

    struct sample_key key = {.pid = pid, .tid = tid, .user_stack_id = -EFAULT};
    bpf_get_current_comm(&key.thread_name, sizeof(key.thread_name));

    int zero_index = 0;
    u32 *control_buffer = control.lookup(&zero_index);
    u32 buffer = control_buffer ? *control_buffer : 0;
#if PYTHON_STACKS
    struct python_stack_event *python = NULL;
    u64 hash = take_python_stack(pid, tid, 1, &python);
    if (hash && python) {
        int stored;
        if (buffer)
            stored = python_stacks_1.insert(&hash, &python->stack);
        else
            stored = python_stacks_0.insert(&hash, &python->stack);
        key.python_stack = kept_python_stack(stored, python, pid, hash);
    }
#endif
    if (buffer)
        key.kernel_stack_id = KERNEL_STACKS ? stacks_1.get_stackid(ctx, 0) : -EFAULT;
    else
        key.kernel_stack_id = KERNEL_STACKS ? stacks_0.get_stackid(ctx, 0) : -EFAULT;
    count_stack_error(key.kernel_stack_id, LOSS_KERNEL_STACK_COLLISION, LOSS_KERNEL_STACK_FAILED);
#if NATIVE_UNWIND
    if (begin_native_unwind(0, &key, buffer))
        cpu_unwinder.call(ctx, 0);  /* does not return unless the call fails */
#endif
    count_cpu_sample(ctx, &key, buffer);
    return 0;
}

#if NATIVE_UNWIND
/* The CPU sampler's native unwinder: some frames per tail call, then the sample. */
int unwind_cpu_stack(void *ctx)
{
    int slot = 0;
    struct native_unwind *s = unwind_scratch.lookup(&slot);
    if (!s)
        return 0;
    if (unwind_frames(s)) {
        cpu_unwinder.call(ctx, 0);
        s->stack.end = UNWIND_TRUNCATED;  /* out of tail calls */
    }
    u64 hash = end_native_unwind(s);
    if (hash) {
        int stored;
        if (s->buffer)
            stored = native_stacks_1.insert(&hash, &s->stack);
        else
            stored = native_stacks_0.insert(&hash, &s->stack);
        s->key.native_stack = kept_native_stack(stored, hash);
    }
    count_cpu_sample(ctx, &s->key, s->buffer);
    return 0;
}
#endif

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

#if PYTHON_STACKS
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
#endif

/* Off-CPU time, exactly: when a target thread leaves the CPU, its stacks and the time
 * are kept by tid (threads migrate between CPUs); when it runs again, the time it was
 * away is added to those stacks. The current task here is the one leaving. A task that
 * is still runnable was preempted (or yielded): that counts for wall time, not blocking.
 * The thread coming in is accounted first: the one leaving may go on to the unwinder. */
TRACEPOINT_PROBE(sched, sched_switch)
{
    u64 now = bpf_ktime_get_ns();
    int zero = 0;
    u32 next = args->next_pid;
    struct offcpu_start *away = offcpu_starts.lookup(&next);
    if (away) {
        u64 delta = now - away->start_ns;
        u32 *buffer = control.lookup(&zero);
#if PYTHON_STACKS
        if (!away->key.python_stack)
            add_late_python_stack(away, next);
#endif
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

    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 pid = pid_tgid >> 32;
    u32 tid = (u32)pid_tgid;
    struct offcpu_start *start = offcpu_scratch.lookup(&zero);
    long state = args->prev_state;
    u32 blocked = (state & OFFCPU_BLOCKED_STATES) != 0;
    u32 exiting = (state & OFFCPU_EXIT_STATES) != 0;
    if (!start || tid == 0 || !is_target(pid))
        return 0;
    /* A thread leaving the CPU while still kept as away came back with no sched_switch
     * traced for it: its time away is unknown, and counted as lost. */
    if (offcpu_starts.lookup(&tid)) {
        count_loss(LOSS_OFFCPU_RETURN_UNTRACED);
        offcpu_starts.delete(&tid);
    }
    if (!(blocked || (OFFCPU_WALL && !exiting)))
        return 0;
    note_seen(pid, tid);
    if (blocked)
        count_offcpu(OFFCPU_BLOCKED);
    __builtin_memset(&start->key, 0, sizeof(start->key));
    start->start_ns = now;
    start->blocked = blocked;
    start->key.pid = pid;
    start->key.tid = tid;
    start->key.user_stack_id = -EFAULT;
    bpf_get_current_comm(&start->key.thread_name, sizeof(start->key.thread_name));
    start->key.kernel_stack_id = KERNEL_STACKS ? offcpu_stacks.get_stackid(args, 0) : -EFAULT;
    count_stack_error(start->key.kernel_stack_id, LOSS_OFFCPU_STACK_COLLISION, LOSS_KERNEL_STACK_FAILED);
#if PYTHON_STACKS
    struct python_stack_event *python = NULL;
    u64 hash = take_python_stack(pid, tid, 0, &python);
    if (hash && python)
        start->key.python_stack = kept_python_stack(offcpu_python_stacks.insert(&hash, &python->stack),
                                                    python, pid, hash);
#endif
#if NATIVE_UNWIND
    if (begin_native_unwind(1, &start->key, 0))
        offcpu_unwinder.call(args, 0);  /* does not return unless the call fails */
#endif
    keep_offcpu_start(args, start);
    return 0;
}

#if NATIVE_UNWIND
/* The off-CPU native unwinder: some frames per tail call, then the thread is kept. */
int unwind_offcpu_stack(void *ctx)
{
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
#endif
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
    code_mapped.delete(&pid);
#if PYTHON_STACKS
    /* Only the thread that called exec is left, running a new image. */
    struct python_thread thread = {.pid = pid, .tid = pid};
    python_threads.delete(&thread);
    python_processes.delete(&pid);
#endif
#if NATIVE_UNWIND
    unwind_processes.delete(&pid);  /* the old image's mappings; the collector frees them */
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
#if OFFCPU
    offcpu_late_python.delete(&tid);
#endif
    if (args->group_dead)
        python_processes.delete(&pid);
#endif
    if (args->group_dead) {
        int known = is_known(pid);
        seen.delete(&pid);
        maps_pending.delete(&pid);
        code_mapped.delete(&pid);
        targets.delete(&pid);
#if NATIVE_UNWIND
        unwind_processes.delete(&pid);
#endif
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

/* A process the collector has read that maps code (a library it dlopens, a JIT's
 * buffer made executable) is flagged, so that the collector reads its maps again when
 * a sample falls outside them, and only then: such an address is mostly no code at all
 * (a frame pointer that was not one), and reading the maps for each cost more than any
 * other part of a drain. */
static __always_inline void note_code_mapped(u64 prot)
{
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    u8 one = 1;
    if ((prot & PROT_EXEC_BIT) && is_target(pid) && is_known(pid))
        code_mapped.update(&pid, &one);
}

TRACEPOINT_PROBE(syscalls, sys_enter_mmap)
{
    note_code_mapped(args->prot);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_mprotect)
{
    note_code_mapped(args->prot);
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
