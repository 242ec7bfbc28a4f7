/* CPU sampler: runs on every CPU's perf clock tick and aggregates stacks in kernel.
 *
 * Settings arrive as -D flags from the collector's config:
 *   COUNTS_ENTRIES, STACK_ENTRIES, TARGET_ENTRIES, SEEN_ENTRIES, EVENT_PAGES  map sizes
 *   FILTER_PIDS     only sample processes in `targets`
 *   FOLLOW_CHILDREN add the children of targets to `targets` as they fork
 *   KERNEL_STACKS   capture kernel stacks
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

static __always_inline void count_loss(int reason)
{
    u64 *n = losses.lookup(&reason);
    if (n)
        (*n)++;
}

static __always_inline void emit(u32 kind, u32 pid)
{
    struct process_event event = {.kind = kind, .pid = pid};
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
        emit(PROCESS_SEEN, pid);
    }

    struct sample_key key = {.pid = pid, .tid = tid, .python_stack_id = -1};
    bpf_get_current_comm(&key.thread_name, sizeof(key.thread_name));

    /* bcc rewrites map calls only where they are written out, not in a macro or
     * through a pointer, so each buffer gets its own three lines. */
    int zero_index = 0;
    u32 *buffer = control.lookup(&zero_index);
    u64 zero = 0, *count;
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
    emit(PROCESS_EXEC, pid);
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
    if (args->group_dead) {
        seen.delete(&pid);
        targets.delete(&pid);
        emit(PROCESS_EXIT, pid);
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
