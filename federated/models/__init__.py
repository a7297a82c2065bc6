"""Pure model code (no I/O)."""
