/* What every part of the sampler shares: the active buffer, loss counts, stack keys, and
 * which processes the collector knows of.
 *
 * The program is the files bpf/__init__.py lists, in that order, compiled by bcc as one.
 * Its settings arrive as -D flags from the collector's SamplerConfig:
 *   features, 0 or 1:
 *     FILTER_PIDS      only processes in `targets`
 *     FOLLOW_CHILDREN  add the children of targets to `targets` as they fork
 *     KERNEL_STACKS    capture kernel stacks
 *     PYTHON_STACKS    walk CPython frames of processes in `python_processes`
 *     OFFCPU_BLOCK     blocking delay: blocks of MIN_BLOCK_NS or more
 *     OFFCPU_WALL      off-CPU time of every kind, for wall-clock profiles
 *     NATIVE_UNWIND    unwind user stacks from the collector's unwind tables, some
 *                      UNWIND_FRAMES_PER_PROGRAM frames per tail call
 *     MEMORY           anonymous memory obtained and held (memory.bpf.c)
 *     FAULTS           page faults, 1 in FAULT_PERIOD
 *   map sizes (the maps of a feature that is off have one entry: WHEN):
 *     SAMPLE_ENTRIES, STACK_ENTRIES, THREAD_ENTRIES, EVENT_PAGES, PYTHON_PROCESSES,
 *     PYTHON_STACK_ENTRIES, PYTHON_EVENT_PAGES, UNWIND_ROWS, UNWIND_MAPPINGS,
 *     NATIVE_STACK_ENTRIES, MEMORY_RANGES, MEMORY_HOLE_ENTRIES
 * The code of a feature that is off sits behind `if (FEATURE)` and is compiled away; its
 * maps remain, with one entry. Only its attach points need #if, since bcc attaches every
 * tracepoint probe it compiles.
 *
 * Double buffering: samples go to the maps of buffer `control[0]`, each pair of maps
 * reached through an array of its two (`counts` holds counts_0 and counts_1, which the
 * collector puts there once the program is loaded, before sampling starts). The collector
 * flips the buffer, lets in-flight samples finish, then drains and clears the other one,
 * so no sample is lost between reading a map and clearing it.
 */
/* Only errno: the perf context is passed through as `void *`, because including
 * bpf_perf_event.h pulls in headers that make bcc's compile five times slower. */
#include <uapi/asm-generic/errno-base.h>
#include "common.h"

#define OFFCPU (OFFCPU_BLOCK || OFFCPU_WALL)
#define WHEN(feature, entries) ((feature) ? (entries) : 1)  /* the size of a feature's map */

BPF_ARRAY(control, u32, 1);
BPF_PERCPU_ARRAY(losses, u64, LOSS_REASONS);
BPF_HASH(targets, u32, u8, THREAD_ENTRIES);
BPF_TABLE("lru_hash", u32, u8, seen, THREAD_ENTRIES);
BPF_TABLE("lru_hash", u32, u8, maps_pending, THREAD_ENTRIES);  /* pid: read again at its next mmap */
BPF_TABLE("lru_hash", u32, u8, code_mapped, THREAD_ENTRIES);   /* pid: mapped code since the collector last asked */
BPF_RINGBUF_OUTPUT(events, EVENT_PAGES);

/* bpf_get_stackid with a map found at run time (bcc's .get_stackid takes a named map). */
static long (*get_stackid)(void *ctx, void *map, u64 flags) = (void *)BPF_FUNC_get_stackid;

static __always_inline u32 active_buffer(void)
{
    int zero = 0;
    u32 *buffer = control.lookup(&zero);
    return buffer ? *buffer : 0;
}

/* The value of key in a hash map found at run time, made from `init` if it has none;
 * NULL when the map is full. */
static __always_inline void *lookup_or_init(void *map, void *key, void *init)
{
    void *value = bpf_map_lookup_elem(map, key);
    if (value)
        return value;
    bpf_map_update_elem(map, key, init, BPF_NOEXIST);
    return bpf_map_lookup_elem(map, key);
}

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

/* -EFAULT means there was no stack of that kind to take (e.g. a user-mode sample has
 * no kernel stack); it is not a loss. */
static __always_inline void count_stack_error(s32 id, int collision, int failed)
{
    if (id == -EEXIST)
        count_loss(collision);
    else if (id < 0 && id != -EFAULT)
        count_loss(failed);
}

static __always_inline void emit(u32 kind, u32 pid, u32 tid)
{
    struct process_event event = {.kind = kind, .pid = pid, .tid = tid};
    bpf_get_current_comm(&event.comm, sizeof(event.comm));
    if (events.ringbuf_output(&event, sizeof(event), 0) != 0)
        count_loss(LOSS_EVENTS_FULL);
}

static __always_inline int is_target(u32 pid)
{
    return !FILTER_PIDS || targets.lookup(&pid) != NULL;
}

/* Whether the collector may hold a snapshot of the process, and so must hear of its exec
 * and exit: one it was told of (seen), one it asked to be told of again (maps_pending:
 * its seen entry was dropped for that), or a target named at start. Most short-lived
 * processes are never sampled, and cost the collector nothing. */
static __always_inline int is_known(u32 pid)
{
    return FILTER_PIDS || seen.lookup(&pid) != NULL || maps_pending.lookup(&pid) != NULL;
}

/* The collector hears of a process the first time it is sampled, and reads its maps. */
static __always_inline void note_seen(u32 pid, u32 tid)
{
    if (seen.lookup(&pid) == NULL) {
        u8 one = 1;
        seen.update(&pid, &one);
        emit(PROCESS_SEEN, pid, tid);
    }
}
