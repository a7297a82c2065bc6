"""Flower ServerApp and ClientApp: thin, every tunable read from the run or node config."""
