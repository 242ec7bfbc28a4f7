/* Process lifecycle: what each part keeps of a process or thread goes when it execs or
 * exits, and the collector hears of it; processes still being mapped are read again. */

/* What came of the collector reading the process's image: it is read again, if ever.
 * The collector frees the unwind mappings it placed. */
static __always_inline void forget_image(u32 pid)
{
    seen.delete(&pid);
    code_mapped.delete(&pid);
    if (PYTHON_STACKS)
        python_processes.delete(&pid);
    if (NATIVE_UNWIND)
        unwind_processes.delete(&pid);
}

static __always_inline void forget_thread(u32 pid, u32 tid)
{
    if (PYTHON_STACKS)
        forget_python_thread(pid, tid);
    if (PYTHON_STACKS && OFFCPU)
        offcpu_late_python.delete(&tid);
    memory_thread_ended(tid);
}

TRACEPOINT_PROBE(sched, sched_process_exec)
{
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    if (!is_target(pid))
        return 0;
    /* Libraries are mapped after exec: the next sample takes the snapshot (or the next
     * mmap, when the collector finds the loader still at work: maps_pending). Only the
     * thread that called exec is left, running the new image. */
    int known = is_known(pid);
    forget_image(pid);
    memory_image_ended(pid);
    forget_thread(pid, pid);
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
    /* sched_process_fork cannot tell threads from processes, so each thread got an
     * entry of its own; drop it with the thread. */
    if (FOLLOW_CHILDREN && tid != pid)
        targets.delete(&tid);
    forget_thread(pid, tid);
    if (!args->group_dead)
        return 0;
    int known = is_known(pid);
    forget_image(pid);
    memory_image_ended(pid);
    maps_pending.delete(&pid);
    targets.delete(&pid);
    if (known)
        emit(PROCESS_EXIT, pid, tid);
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
    if (maps_pending.lookup(&pid) != NULL) {
        maps_pending.delete(&pid);
        note_seen(pid, (u32)pid_tgid);
    }
    memory_mmap_exit(args, args->ret);  /* last: it may go on to the unwinder */
    return 0;
}

/* A process the collector has read that maps code (a library it dlopens, a JIT's
 * buffer made executable) is flagged, so that the collector reads its maps again when
 * a sample falls outside them, and only then: such an address is mostly no code at all
 * (a frame pointer that was not one), and reading the maps for each cost more than any
 * other part of a drain. */
#define PROT_EXEC_BIT 0x4  /* PROT_EXEC of mmap(2) and mprotect(2) */

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
    memory_mmap_enter(args->addr, args->len, args->prot, args->flags);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_mprotect)
{
    note_code_mapped(args->prot);
    memory_mprotect(args, args->start, args->len, args->prot);  /* last: it may go on to the unwinder */
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
