"""The process table: what each process maps, its container, its CPython interpreter and
the unwind tables BPF needs for it."""
