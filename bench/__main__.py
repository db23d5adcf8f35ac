"""`python -m bench model|http ...`: see bench/model_bench.py and bench/http_bench.py."""

from __future__ import annotations

import argparse
import sys


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    commands = parser.add_subparsers(dest="command", required=True)
    model = commands.add_parser("model", help="engine vs the seed's algorithm, per stage and batch size")
    model.add_argument("--weights", required=True, help="checkpoint (e.g. `python -m weights random` output)")
    model.add_argument("--config", help="model config JSON (default: full size)")
    model.add_argument("--device", default="cpu")
    model.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    model.add_argument("--compile", action="store_true", help="torch.compile the encoder and the decode step")
    model.add_argument("--batch-sizes", type=_ints, default=[1, 8])
    model.add_argument("--step-rows", type=_ints, default=[6, 48, 64])
    model.add_argument("--max-new-tokens", type=int, default=128)
    model.add_argument("--repeats", type=int, default=1)
    model.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True)
    model.add_argument("--baseline-images", type=int, default=1)
    model.add_argument("--out", default="bench/results")
    handler = commands.add_parser("handler", help="images/s through the handler's batched path")
    handler.add_argument("--weights", required=True)
    handler.add_argument("--config", help="model config JSON (default: full size)")
    handler.add_argument("--device", default="cpu")
    handler.add_argument("--compile", action="store_true")
    handler.add_argument("--batch-size", type=int, default=8)
    handler.add_argument("--batches", type=int, default=3)
    handler.add_argument("--max-new-tokens", type=int, default=64)
    handler.add_argument("--decode-threads", type=int, default=8)
    handler.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    if args.command == "model":
        from .model_bench import run
    else:
        from .handler_bench import run
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
