"""Native code: ELF symbols, DWARF lines, demangling, unwind tables and their cache."""
