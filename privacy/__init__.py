"""Privacy primitives: pseudonyms, date shifting, generalization, DP accounting, ledgers."""
