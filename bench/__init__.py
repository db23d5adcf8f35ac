"""Benchmarks: `python -m bench model ...` (the engine against the seed's algorithm) and `python -m bench http ...`."""
