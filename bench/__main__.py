"""`python -m bench model|handler|http ...`: see bench/model_bench.py, bench/handler_bench.py and bench/http_bench.py."""

from __future__ import annotations

import argparse
import sys

from model.layouts import STATIC_LAYOUTS


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def _size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    try:
        return int(width), int(height)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WxH, e.g. 4032x3024, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench")
    commands = parser.add_subparsers(dest="command", required=True)
    model = commands.add_parser("model", help="engine vs the seed's algorithm, per stage and batch size")
    model.add_argument("--weights", required=True, help="checkpoint (e.g. `python -m weights random` output)")
    model.add_argument("--config", help="model config JSON (default: full size)")
    model.add_argument("--device", default="cpu")
    model.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                       help="auto (default): bfloat16 on GPUs and on CPUs with native bf16 products, else float32")
    model.add_argument("--compile", action="store_true", help="torch.compile the encoder and the decode step")
    model.add_argument("--dynamic-rows", action="store_true",
                       help="with --compile: one decode-step compilation per span for all row buckets")
    model.add_argument("--compile-prefill", action=argparse.BooleanOptionalAction, default=True,
                       help="with --compile: the two prefill passes compiled too")
    model.add_argument("--static-layout", choices=STATIC_LAYOUTS, default="rows",
                       help="with --compile: the static decode cache's layout (images needs --dynamic-rows)")
    model.add_argument("--compile-step", action="store_true",
                       help="torch.compile the eager decode step, packed products kept (the CPU's compiled path; "
                            "the handler's cpu_compile_decode)")
    model.add_argument("--quantize", choices=["int8"], help="int8 decoder weights, activations quantized per row (CPU; model/quantize.py)")
    model.add_argument("--prepack", action=argparse.BooleanOptionalAction, default=None,
                       help="oneDNN-packed decoder Linears (default: on for CPU float32, and for bfloat16 "
                            "where oneDNN has bf16 products; see model/packing.py)")
    model.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=True,
                       help="merged q/k/v and feature/gate Linears (model/fusion.py)")
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
    handler.add_argument("--dynamic-rows", action=argparse.BooleanOptionalAction, default=None,
                         help="the handler's compile_dynamic_rows (default: model-config.yaml's)")
    handler.add_argument("--compile-prefill", action=argparse.BooleanOptionalAction, default=True,
                         help="with --compile: the handler's compile_prefill")
    handler.add_argument("--static-layout", choices=STATIC_LAYOUTS,
                         help="the handler's static_layout (default: model-config.yaml's)")
    handler.add_argument("--batch-size", type=int, default=8)
    handler.add_argument("--batches", type=int, default=3)
    handler.add_argument("--max-new-tokens", type=int, default=64)
    handler.add_argument("--decode-threads", type=int, default=8)
    handler.add_argument("--request-form", choices=["json", "raw"], default="json",
                         help="JSON bodies with base64 images, or the image bytes as the body")
    handler.add_argument("--photo-size", type=_size, default=(640, 480),
                         help="WxH of the synthetic JPEGs sent (e.g. 4032x3024, a 12 MP camera photo)")
    handler.add_argument("--jpeg-draft", action=argparse.BooleanOptionalAction, default=None,
                         help="the handler's jpeg_draft (default: model-config.yaml's)")
    handler.add_argument("--decode-processes", type=int,
                         help="the handler's decode_processes: a process pool instead of the threads, 0 for the "
                         "threads (default: model-config.yaml's, processes on a GPU, threads on CPU)")
    handler.add_argument("--decode-intra-op-threads", type=int,
                         help="the handler's decode_intra_op_threads (default: model-config.yaml's)")
    handler.add_argument("--workers", type=int, default=1,
                         help="handler processes on the same device, timed together (TorchServe's min_worker)")
    handler.add_argument("--warmup", action="store_true",
                         help="the handler's own warm-up (every graph a full batch can need), timed")
    handler.add_argument("--out", default="bench/results")
    http = commands.add_parser("http", help="load test of a running TorchServe: batching on vs off, concurrency sweep")
    target = http.add_argument_group("server (a running one, or --start)")
    target.add_argument("--url", default="http://127.0.0.1:8080", help="inference address")
    target.add_argument("--management-url", default="http://127.0.0.1:8081")
    target.add_argument("--metrics-url", default="http://127.0.0.1:8082", help="for the mean batch size ('' = off)")
    target.add_argument("--model", default="captioner", help="model whose archive is registered again (or measured)")
    target.add_argument("--archive", help="archive to register (default: the model's modelUrl from describe)")
    target.add_argument("--key-file", help="TorchServe's key_file.json (inference and management keys)")
    target.add_argument("--key", help="inference key (overrides --key-file)")
    target.add_argument("--management-key", help="management key (overrides --key-file)")
    target.add_argument("--start", action="store_true", help="build the archive and start a private TorchServe")
    target.add_argument("--weights", help="checkpoint for --start")
    target.add_argument("--config", help="model config JSON for --start (default: full size)")
    target.add_argument("--threads", type=int, help="--start: the handler's intra-op threads and OMP_NUM_THREADS "
                        "(default: every usable core, a container's CPU limit included); otherwise recorded as given")
    target.add_argument("--decode-threads", type=int, help="--start: the handler's decode_threads")
    target.add_argument("--cpu-quantize", choices=["int8"], help="--start: the handler's cpu_quantize")
    target.add_argument("--cpu-compile-decode", action="store_true",
                        help="--start: the handler's cpu_compile_decode (the compiled CPU decode step)")
    target.add_argument("--workdir", help="--start: parent folder of the private TorchServe folder")
    target.add_argument("--keep-workdir", action="store_true")
    modes = http.add_argument_group("modes")
    modes.add_argument("--register", action=argparse.BooleanOptionalAction, default=True,
                       help="register the archive once per mode (--no-register: measure --model as it is)")
    modes.add_argument("--batch-size", type=int, default=8)
    modes.add_argument("--max-batch-delay", type=_ints, default=[50], help="ms; several values = several modes")
    modes.add_argument("--single", action=argparse.BooleanOptionalAction, default=True,
                       help="also register with batch_size 1 (the one-request-at-a-time baseline)")
    load = http.add_argument_group("load")
    load.add_argument("--concurrency", type=_ints, default=[1, 2, 4, 8, 16], help="closed-loop client counts")
    load.add_argument("--rate", type=_floats, default=[], help="open-loop Poisson arrival rates (requests/s)")
    load.add_argument("--requests", type=int, help="requests per level (default: --rounds per client)")
    load.add_argument("--rounds", type=int, default=2, help="requests per client per level")
    load.add_argument("--min-requests", type=int, default=4)
    load.add_argument("--open-seconds", type=float, default=30.0, help="open loop: rate x this many requests")
    load.add_argument("--max-seconds", type=float, default=300.0, help="per level: no new requests after this")
    load.add_argument("--repeats", type=int, default=2, help="repeats of the sweep, interleaved with the modes")
    load.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")
    request = http.add_argument_group("request")
    request.add_argument("--max-new-tokens", type=int, help="default: the service's (128)")
    request.add_argument("--num-captions", type=int, help="per style (default: the service's, 2)")
    request.add_argument("--styles", type=lambda t: [s for s in t.split(",") if s], help="default: all three")
    request.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="extra JSON option")
    request.add_argument("--image-size", type=_ints, default=[320, 240], help="W,H of the generated JPEG")
    http.add_argument("--out", default="bench/results")
    http.add_argument("--name", default="http", help="output file stem")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "model":
        from .model_bench import run
    elif args.command == "http":
        from .http_bench import run

        run(args, argv)
        return 0
    else:
        from .handler_bench import run
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
