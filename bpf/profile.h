/* Layouts shared by the BPF sampler and the collector: declared here once. */
#ifndef BPFPROF_PROFILE_H
#define BPFPROF_PROFILE_H

#define THREAD_NAME_LEN 16

/* One aggregation key per distinct (thread, stacks) seen by the sampler. */
struct sample_key {
    u32 pid;              /* process (tgid) */
    u32 tid;              /* thread */
    s32 kernel_stack_id;  /* < 0: no kernel stack (sample in user mode, or --no-kernel) */
    s32 user_stack_id;    /* < 0: no user stack (kernel thread) */
    s32 python_stack_id;  /* < 0: no interpreter stack; filled once CPython walking lands */
    char thread_name[THREAD_NAME_LEN];
};

/* What the collector learns about processes as they happen, via the ring buffer. */
enum process_event_kind {
    PROCESS_SEEN = 1,   /* first sample of a process (or first after exec): snapshot its maps */
    PROCESS_EXEC = 2,   /* the process replaced its image: earlier snapshots are stale */
    PROCESS_EXIT = 3,   /* the whole thread group is gone */
};

struct process_event {
    u32 kind;
    u32 pid;
    char comm[THREAD_NAME_LEN];
};

/* Samples and events that could not be recorded, counted per reason (array index). */
enum loss_reason {
    LOSS_KERNEL_STACK_COLLISION,
    LOSS_USER_STACK_COLLISION,
    LOSS_KERNEL_STACK_FAILED,
    LOSS_USER_STACK_FAILED,
    LOSS_COUNTS_FULL,
    LOSS_EVENTS_FULL,
    LOSS_TARGETS_FULL,
    LOSS_REASONS,
};

#endif
