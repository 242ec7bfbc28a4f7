/* Layouts shared by the BPF sampler and the collector: declared here once. */
#ifndef BPFPROF_COMMON_H
#define BPFPROF_COMMON_H

#define THREAD_NAME_LEN 16

/* Stacks are keyed by FNV-1a over their words: fnv_add(fnv_add(FNV_OFFSET, a), b)... */
#define FNV_OFFSET 14695981039346656037ULL
#define FNV_PRIME 1099511628211ULL
#define PYTHON_STACK_DEPTH 128  /* frames walked, shim frames included */
#define PYTHON_THREAD_SEARCH 256  /* thread states looked at to find a thread's own */

/* One aggregation key per distinct (thread, stacks) seen by the sampler. */
struct sample_key {
    u32 pid;              /* process (tgid) */
    u32 tid;              /* thread */
    s32 kernel_stack_id;  /* < 0: no kernel stack (sample in user mode, or --no-kernel) */
    s32 user_stack_id;    /* < 0: no user stack (kernel thread) */
    u64 python_stack;     /* key in python_stacks_N; 0: no interpreter stack */
    u64 native_stack;     /* key in native_stacks_N, unwound from unwind tables; 0: none,
                           * the user stack (if any) is user_stack_id's, by frame pointers */
    char thread_name[THREAD_NAME_LEN];
};

/* What the collector learns about processes as they happen, via the ring buffer. */
enum process_event_kind {
    PROCESS_SEEN = 1,   /* first sample of a process (or first after exec): snapshot its maps */
    PROCESS_EXEC = 2,   /* the process replaced its image: earlier snapshots are stale */
    PROCESS_EXIT = 3,   /* the whole thread group is gone */
    PYTHON_THREAD = 4,  /* a CPython thread was found (or cannot be looked for yet): read its name */
    OOM_VICTIM = 5,     /* the OOM killer chose the process: write what it holds now */
};

struct process_event {
    u32 kind;
    u32 pid;
    u32 tid;
    char comm[THREAD_NAME_LEN];
};

/* CPython: where the walker finds things in one process's interpreter, set by the
 * collector from its layout of that version. Offsets < 0: no such field. */
enum python_frame_chain {
    PYTHON_FRAME_OBJECTS = 0,  /* <= 3.10: tstate->frame, PyFrameObject.f_back, f_lasti */
    PYTHON_CFRAME = 1,         /* 3.11-3.12: tstate->cframe->current_frame, prev_instr */
    PYTHON_CURRENT_FRAME = 2,  /* 3.13+: tstate->current_frame, instr_ptr */
};

struct python_process {
    u64 runtime;               /* address of _PyRuntime (3.6: of interp_head, the list head) */
    s32 runtime_interpreters_head;
    s32 interp_next;
    s32 interp_threads_head;
    s32 tstate_next;
    s32 tstate_thread_id;      /* pthread_t, the address of the C library's thread struct */
    s32 tstate_native_thread_id;  /* < 0 (<= 3.10): the tid is found through pthread_tid */
    s32 pthread_tid;           /* where that struct keeps the tid; < 0: not learnt yet */
    u32 frame_chain;           /* enum python_frame_chain */
    s32 tstate_frame;
    s32 cframe_current_frame;
    s32 frame_previous;
    s32 frame_code;
    s32 frame_instr;
    s32 frame_owner;
    s32 frame_is_entry;
    s32 code_firstlineno;
    s32 code_name;
};

struct python_thread {
    u32 pid;
    u32 tid;
};

/* _PyInterpreterFrame.owner from here up: a shim frame where the eval loop was entered
 * (FRAME_OWNED_BY_CSTACK in 3.12 and 3.13; FRAME_OWNED_BY_INTERPRETER or _CSTACK from 3.14). */
#define PYTHON_OWNED_BY_SHIM 3
#define PYTHON_FRAME_ENTRY 1       /* flag: the eval loop was entered at this frame */
#define PYTHON_FRAME_SHIM 2        /* flag: a shim frame (3.12+), not Python code */

struct python_frame {
    u64 code;                  /* PyCodeObject address */
    s32 instr;                 /* f_lasti (<= 3.10); instruction address - code address (3.11+) */
    u16 check;                 /* code fields hashed, to catch a freed and reused address */
    u16 flags;                 /* PYTHON_FRAME_* */
};

struct python_stack {
    u32 depth;
    u32 truncated;             /* more frames toward the root than PYTHON_STACK_DEPTH */
    struct python_frame frames[PYTHON_STACK_DEPTH];  /* leaf first */
};

/* A Python stack the first time it is stored after a drain, sent at once (only its
 * `depth` frames) so that the collector reads its code objects while they still exist. */
struct python_stack_event {
    u32 pid;
    u32 reserved;
    struct python_stack stack;
};

/* Native unwinding from the unwind tables the collector builds (symbolizer/native/unwind_table.py).
 * unwind_rows holds every loaded binary's rows, each binary a run sorted by PC; a
 * process's executable mappings are a run of unwind_mappings sorted by start, found
 * through unwind_processes. Runs are placed by the collector; BPF only reads them. */
#define NATIVE_STACK_DEPTH 127
#define UNWIND_MAPPING_SEARCH 10  /* binary search steps: 1024 mappings a process at most */
#define UNWIND_ROW_SEARCH 22      /* 4M rows a binary at most */

/* One unwind row (`UnwindRow` in unwind_table.py has the meaning of every field). */
#define UNWIND_ROW_PC(row) ((row) >> 32)
#define UNWIND_ROW_KIND(row) (((row) >> 16) & 0xFF)
#define UNWIND_ROW_CFA_OFFSET(row) (((row) & 0xFFFF) * 8)
#define UNWIND_ROW_RBP(row) ((s8)((row) >> 24))

enum cfa_kind {  /* CfaKind in unwind_table.py; from 16 on, rules BPF cannot follow */
    CFA_NONE = 0,
    CFA_RSP = 1,
    CFA_RBP = 2,
    CFA_PLT = 3,
    CFA_END = 4,
    CFA_SIGNAL = 5,
};
#define RBP_OTHER -128

struct unwind_mapping {
    u64 start;      /* first address */
    u64 end;        /* the address after the last */
    u64 bias;       /* address - bias: the ELF virtual address that rows are keyed by */
    u32 first_row;  /* its binary's run in unwind_rows */
    u32 num_rows;   /* 0: no unwind table; frame pointers are followed */
};

struct unwind_process {
    u32 first_mapping;  /* its run in unwind_mappings */
    u32 num_mappings;
};

/* x86-64 registers as the kernel saves them on entry (struct pt_regs, which the BPF
 * ABI exposes as bpf_user_pt_regs_t), and the signal frame glibc's __restore_rt returns
 * through: a ucontext_t at the stack pointer, its mcontext's registers from byte 40. */
struct user_regs {
    u64 r15, r14, r13, r12, bp, bx, r11, r10, r9, r8, ax, cx, dx, si, di, orig_ax, ip, cs, flags, sp, ss;
};
#define SIGNAL_FRAME_RBP 120
#define SIGNAL_FRAME_RSP 160
#define SIGNAL_FRAME_RIP 168

struct native_stack {
    u32 depth;
    u32 end;  /* enum unwind_end: why unwinding stopped */
    u64 pcs[NATIVE_STACK_DEPTH];  /* leaf first: where the thread is, then return addresses */
};

/* A stack being unwound, carried across the unwinder's tail calls (per CPU). */
struct native_unwind {
    u64 pc, sp, bp;      /* the frame's registers; bp 0: the caller's RBP was lost */
    u32 exact;           /* pc is where the thread is (leaf, or a signal's interrupted code) */
    u32 buffer;          /* the double buffer a CPU sample goes to */
    u32 from_table;      /* pc came from an unwind table's rule, so it ought to be mapped */
    u32 reserved;
    struct sample_key key;  /* the sample's, native_stack set when it is stored */
    struct native_stack stack;
};

/* Why unwinding a stack stopped, counted per stack (array index). */
enum unwind_end {
    UNWIND_COMPLETE,           /* reached the outermost frame (no return address) */
    UNWIND_FRAME_POINTER_END,  /* a frame-pointer chain (no unwind table) ended */
    UNWIND_TRUNCATED,          /* deeper than NATIVE_STACK_DEPTH */
    UNWIND_NO_MAPPING,         /* an address in no known mapping (the collector is told to read the maps again) */
    UNWIND_UNSUPPORTED_RULE,   /* a CFA rule BPF cannot follow (see CfaKind) */
    UNWIND_RBP_LOST,           /* the CFA is from RBP, whose value was not recovered */
    UNWIND_READ_FAILED,        /* the stack could not be read where the rule says */
    UNWIND_FALLBACK,           /* the leaf's address in no mapping: the frame-pointer stack was taken */
    UNWIND_ENDS,
};

/* Off-CPU time of one stack (block profile): times it left the CPU, and for how long. */
struct offcpu_value {
    u64 count;
    u64 ns;
};

/* A thread that left the CPU (blocked, or for wall time also preempted): since when,
 * and its stacks as it left (stack ids in offcpu_stacks, which is not double-buffered:
 * a thread may stay off-CPU across drains). */
struct offcpu_start {
    u64 start_ns;
    u32 blocked;  /* 0: still runnable (preempted or yielded) */
    u32 reserved;
    struct sample_key key;
};

/* A Python stack the collector walked for a thread that left the CPU before its process
 * was read. A thread's stacks cannot change while it is away, so a stack walked while
 * the thread's offcpu_start kept the same start_ns is the one it left with. */
struct offcpu_late_python {
    u64 start_ns;      /* of the offcpu_start it completes */
    u64 python_stack;  /* key in offcpu_python_stacks */
};

/* sched_switch's prev_state: the task states that mean blocked, and those of a task's
 * last switch (X and Z). Running is 0; a preempted task reports TASK_REPORT_MAX (0x100). */
#define OFFCPU_BLOCKED_STATES 0xCF
#define OFFCPU_EXIT_STATES 0x30

/* Off-CPU switches counted per kind (array index). */
enum offcpu_stat {
    OFFCPU_BLOCKED,    /* a target thread left the CPU blocked */
    OFFCPU_BELOW_MIN,  /* it ran again sooner than the minimum block time: not in the block profile */
    OFFCPU_STATS,
};

/* Memory (memory.bpf.c): the anonymous ranges processes obtain from the kernel, by
 * address, each with the stacks that obtained it, until they are unmapped. */
struct memory_range_key {
    u32 pid;
    u32 pad;
    u64 start;
};

#define MEMORY_RESERVED 1  /* flag: PROT_NONE address space, not in use until made accessible */

struct memory_range {
    u64 end;         /* the address after the last */
    u64 generation;  /* of the process image that obtained it (struct memory_process) */
    u64 since_ns;    /* when it was obtained */
    u32 flags;       /* MEMORY_* */
    u32 pad;
    struct sample_key key;  /* the thread and stacks that obtained it; stacks in memory_*stacks */
};

/* A process image holding ranges. A new image (exec, or a new process reusing the pid)
 * has a new generation: ranges of an older one are left over from an image that is gone,
 * which the collector counts as held at its end and removes. */
struct memory_process {
    u64 generation;
    s64 ranges;
    u64 obtained;  /* bytes obtained so far: the collector reads the process once it is MEMORY_READ_BYTES */
};

#define MEMORY_READ_BYTES (1 << 20)

enum memory_call_kind {
    MEMORY_CALL_MMAP = 1,
    MEMORY_CALL_MREMAP = 2,
};

/* An mmap or mremap between entry and exit, kept by tid. */
struct memory_call {
    u64 addr;
    u64 len;      /* mremap: the old length */
    u64 new_len;  /* mremap */
    u32 kind;     /* enum memory_call_kind */
    u32 flags;    /* mmap's */
    u64 prot;     /* mmap's */
};

/* Allocations under one key: how many, and their bytes. */
struct memory_value {
    u64 count;
    u64 bytes;
};

/* An unmapping that starts at no range's start and ends at no range's end (a hole in a
 * range, or one that crosses ranges). The collector applies it to the ranges obtained
 * before it. */
struct memory_hole {
    u64 end;
    u64 since_ns;
};

/* A range being obtained, carried across the unwinder's tail calls (per CPU). */
struct memory_obtain {
    u64 start;
    u64 end;
    struct sample_key key;
};

/* Memory events counted per kind (array index). */
enum memory_stat {
    MEMORY_RANGES_LEFT,  /* ranges of process images that ended (exit or exec), for the collector to remove */
    MEMORY_HOLES,        /* unmappings at no range's start or end, sent to the collector */
    MEMORY_LONG_UNMAPS,  /* unmappings across more ranges than BPF follows, the rest sent as a hole */
    MEMORY_STATS,
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
    LOSS_PYTHON_STACKS_FULL,
    LOSS_PYTHON_TRUNCATED,
    LOSS_PYTHON_EVENTS_FULL,
    LOSS_OFFCPU_THREADS_FULL,
    LOSS_BLOCK_FULL,
    LOSS_WALL_FULL,
    LOSS_OFFCPU_STACK_COLLISION,
    LOSS_NATIVE_STACKS_FULL,
    LOSS_OFFCPU_RETURN_UNTRACED,  /* a thread left the CPU with no sched_switch seen bringing it back */
    LOSS_MEMORY_RANGES_FULL,
    LOSS_ALLOC_FULL,
    LOSS_MEMORY_STACK_COLLISION,
    LOSS_MEMORY_CALLS_FULL,
    LOSS_MEMORY_HOLES_FULL,
    LOSS_FAULTS_FULL,
    LOSS_REASONS,
};

#endif
