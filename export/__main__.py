"""``python -m export --weights PATH [--config PATH] [--model-name captioner] [--version 1.0]
[--output DIR] [--model-config PATH]``: build ``DIR/<model-name>.mar`` for TorchServe."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .archive import COMPRESSION, DEFAULT_MODEL_CONFIG, ExportError, build_archive


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m export",
        description="Build the TorchServe model archive (.mar) of the caption model.",
    )
    parser.add_argument("--weights", required=True, help="the checkpoint (state dict .pt, bfloat16 or float32)")
    parser.add_argument("--config", help="model config JSON (default: the full-size seed preset)")
    parser.add_argument("--model-name", default="captioner", help="name of the model and of the archive (default: captioner)")
    parser.add_argument("--version", default="1.0", help="model version recorded in the archive (default: 1.0)")
    parser.add_argument("--output", default="model-store", help="folder for the archive (default: model-store)")
    parser.add_argument("--model-config", default=str(DEFAULT_MODEL_CONFIG),
                        help="TorchServe model-config.yaml to ship (default: handler/model-config.yaml)")
    parser.add_argument("--archive-format", default="default", choices=list(COMPRESSION),
                        help="default: deflate-compressed .mar; zip-store: uncompressed .mar (faster to build)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        result = build_archive(
            args.weights, args.config, model_name=args.model_name, version=args.version,
            output=args.output, model_config=args.model_config, archive_format=args.archive_format,
        )
    except ExportError as exc:
        print(f"export failed: {exc}", file=sys.stderr)
        return 2
    path = result.path.resolve()
    store = path.parent
    print(f"archive: {path}")
    print(f"size: {result.size_bytes / 1e6:.1f} MB ({result.size_bytes} bytes), built in {result.seconds:.1f} s")
    print(f"sha256: {result.sha256} (the same inputs give the same archive)")
    print("next: start TorchServe with it (from the repository root):")
    if store == (Path.cwd() / "model-store").resolve():
        print("  torchserve --start --ncs --ts-config config.properties")
    else:
        print(f"  torchserve --start --ncs --ts-config config.properties --model-store {store} --models {path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
