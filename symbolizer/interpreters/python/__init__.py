"""Everything CPython: layouts per version, code objects, line tables and thread names."""
