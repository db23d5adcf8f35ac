"""Command-line captioner: `python -m model IMAGE [IMAGE ...] --weights PATH [options]`.

All images of one call are captioned as one batch. Prints
`{"<image path>": {"Concise": [...], "Narrative": [...], "Descriptive": [...]}}` as JSON.
Sampling options given here override the defaults of every selected style.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from .checkpoint import CheckpointError
from .engine import CaptionEngine
from .image import ImageError, load_pixel_values
from .precision import AUTO, resolve_dtype
from .styles import STYLES, OptionError, make_plan
from .tokenizer import VOCAB_PATH

# CLI flag -> request option name (the same names the HTTP API uses)
OPTION_FLAGS = {
    "num_captions": int, "temperature": float, "top_k": int, "top_p": float,
    "repetition_penalty": float, "no_repeat_ngram": int, "max_new_tokens": int, "seed": int,
}
_OPTION_NAMES = {"no_repeat_ngram": "no_repeat_ngram_size"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m model", description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", metavar="IMAGE")
    parser.add_argument("--weights", required=True, help="the seed checkpoint (weights.pt)")
    parser.add_argument("--config", help="model config JSON (default: the seed's full-size config)")
    parser.add_argument("--tokenizer", default=str(VOCAB_PATH), help="WordPiece vocab.txt (default: vendored)")
    parser.add_argument("--styles", default=",".join(STYLES), help="comma-separated subset of " + ",".join(STYLES))
    for name, kind in OPTION_FLAGS.items():
        parser.add_argument("--" + name.replace("_", "-"), type=kind)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default=AUTO, choices=[AUTO, "float32", "bfloat16"],
                        help="auto (default): bfloat16 on GPUs and on CPUs with native bf16 products, else float32")
    return parser.parse_args(argv)


def request_options(args: argparse.Namespace) -> dict:
    options = {"styles": args.styles}
    for name in OPTION_FLAGS:
        if getattr(args, name) is not None:
            options[_OPTION_NAMES.get(name, name)] = getattr(args, name)
    return options


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        plan = make_plan(request_options(args))
        engine = CaptionEngine.from_files(args.weights, config=args.config, vocab=args.tokenizer,
                                          device=args.device, dtype=resolve_dtype(args.dtype, args.device))
        size = engine.config.image_size
        pixels = torch.stack([load_pixel_values(path, size) for path in args.images])
    except (OptionError, CheckpointError, ImageError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    captions = engine.caption(pixels, [plan] * len(args.images))
    print(json.dumps(dict(zip(args.images, captions)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
