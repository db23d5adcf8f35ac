"""Command line for the checkpoint: ``python -m weights {fetch,verify,random}``.

Exit status: 0 done; 1 failed (download, checksum, invalid checkpoint); 2 usage error;
3 no network access (the message says how to proceed offline).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import DEFAULT_OUTPUT, DEFAULT_RANDOM_OUTPUT, URL_ENV, default_url, load_manifest, official_file

EXIT_FAILED, EXIT_USAGE, EXIT_OFFLINE = 1, 2, 3


def _cmd_fetch(args: argparse.Namespace) -> int:
    from .fetch import FetchError, NetworkUnavailable, fetch

    try:
        fetch(args.url, args.output, args.sha256, args.size, retries=args.retries, connect_timeout=args.connect_timeout)
    except NetworkUnavailable as exc:
        print(f"error: no network access: {exc}", file=sys.stderr)
        return EXIT_OFFLINE
    except FetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def validate_structure(path: Path, config_path: Path | None) -> None:
    """Full structural check by the model package's loader; raises ``CheckpointError``."""
    from model.checkpoint import load_state_dict
    from model.config import CaptionConfig

    config = CaptionConfig.from_json(config_path) if config_path else CaptionConfig.from_dict(load_manifest()["config"])
    load_state_dict(path, config)


def _cmd_verify(args: argparse.Namespace) -> int:
    from .fetch import check_file

    official = official_file()
    path = Path(args.path)
    if not path.is_file():
        print(f"error: {path} does not exist", file=sys.stderr)
        return EXIT_FAILED
    problem = check_file(path, official["sha256"], official["size_bytes"])
    if problem is None:
        print(f"OK: {path} is the official checkpoint ({official['size_bytes']:,} bytes, sha256 {official['sha256']})")
        return 0
    if args.official:
        print(f"error: not the official checkpoint: {problem}", file=sys.stderr)
        return EXIT_FAILED
    print(f"{path} is not the official file ({problem}); checking it as a checkpoint of its own", file=sys.stderr)
    try:
        validate_structure(path, args.config)
    except ValueError as exc:  # model.checkpoint.CheckpointError is a ValueError, as are config errors
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"OK: {path} is a structurally valid checkpoint (not the official weights)")
    if path.stat().st_size == official["size_bytes"]:
        print(f"warning: {path} has the official checkpoint's size but not its sha256: weights of your own, or a "
              "damaged copy of the official file (a flipped byte inside a tensor loads without error). "
              "Check a copy of the official file with --official.", file=sys.stderr)
    return 0


def _cmd_random(args: argparse.Namespace) -> int:
    from .random_init import WARNING, write_random_checkpoint

    if args.output.exists() and not args.force:
        print(f"error: {args.output} exists; pass --force to replace it with random weights", file=sys.stderr)
        return EXIT_FAILED
    print(WARNING, file=sys.stderr)
    out = write_random_checkpoint(args.output, seed=args.seed)
    print(f"wrote {out} ({out.stat().st_size:,} bytes, seed {args.seed})")
    return 0


def _at_least(low: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    parse.__name__ = f"integer >= {low}"  # argparse names the type in its error message
    return parse


def build_parser() -> argparse.ArgumentParser:
    official = official_file()
    parser = argparse.ArgumentParser(prog="python -m weights", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fetch", help="download and verify the official checkpoint")
    p.add_argument("--url", default=None, help=f"source URL (default ${URL_ENV} or {default_url()})")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="final path (default %(default)s)")
    p.add_argument("--sha256", default=None, help=f"expected sha256 (default {official['sha256']})")
    p.add_argument("--size", type=_at_least(1), default=-1, help=f"expected size in bytes (default {official['size_bytes']})")
    p.add_argument("--retries", type=_at_least(0), default=2, help="resumes of a transfer cut mid-way (default %(default)s)")
    p.add_argument("--connect-timeout", type=float, default=10.0, help="seconds (default %(default)s)")
    p.set_defaults(func=_cmd_fetch)

    p = sub.add_parser("verify", help="check a checkpoint: the official file, or a valid one of your own")
    p.add_argument("path", type=Path)
    p.add_argument("--official", action="store_true", help="require the official file's size and sha256")
    p.add_argument("--config", type=Path, default=None, help="model config JSON of a checkpoint of your own")
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser("random", help="write a full-size RANDOM-INIT checkpoint (nonsense captions)")
    p.add_argument("--output", type=Path, default=DEFAULT_RANDOM_OUTPUT, help="(default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace an existing file (never done without it)")
    p.set_defaults(func=_cmd_random)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
