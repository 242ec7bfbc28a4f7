"""Output: one module per format, the function table, and the live top."""
