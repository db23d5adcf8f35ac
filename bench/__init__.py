"""Benchmarks: `python -m bench model ...` (the engine against the seed's algorithm), `python -m bench handler ...`
(the handler's batched path without the server) and `python -m bench http ...` (TorchServe under load)."""
