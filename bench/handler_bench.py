"""Throughput of the handler's batched path (parse, decode, preprocess, one engine call, JSON).

Drives `handler.captioner_handler.CaptionHandler` directly with a minimal stand-in for
TorchServe's context, so it runs where TorchServe is not installed (a GPU box): each batch
is what a worker receives from the frontend's dynamic batching, JSON requests with base64
images. Prints images/s and the milliseconds per image of each handler stage; writes
`<out>/handler-<device>.json`.
"""

from __future__ import annotations

import base64
import json
import tempfile
import time
from pathlib import Path

import torch
import yaml

from handler.captioner_handler import CaptionHandler
from model.config import PRESETS, CaptionConfig

from .model_bench import synthetic_jpegs

REPO = Path(__file__).resolve().parents[1]


class StubContext:
    """The attributes of ts.context.Context that the handler reads, and per-request statuses."""

    def __init__(self, model_dir: Path, gpu_id, model_yaml_config: dict, batch_size: int = 1):
        self.system_properties = {"model_dir": str(model_dir), "gpu_id": gpu_id, "batch_size": batch_size}
        self.model_yaml_config = model_yaml_config
        self.model_name = "captioner"
        self.manifest = {"model": {"serializedFile": "weights.pt"}}
        self.statuses: dict[int, int] = {}

    def set_response_status(self, code: int, phrase: str = "", idx: int = 0) -> None:
        self.statuses[idx] = code


def make_model_dir(path: Path, weights: Path, config: CaptionConfig, handler_overrides: dict) -> dict:
    (path / "weights.pt").symlink_to(Path(weights).resolve())
    config.to_json(path / "caption_config.json")
    model_yaml = yaml.safe_load((REPO / "handler" / "model-config.yaml").read_text())
    model_yaml["handler"].update(vocab=str(REPO / "model" / "assets" / "vocab.txt"), **handler_overrides)
    return model_yaml


def stage_ms_per_image(handler: CaptionHandler, rows: list[dict], repeats: int) -> dict[str, float]:
    """The handler's three stages timed apart (best of `repeats`), in ms per image:
    preprocess (parse, base64, decode and resize in the thread pool), inference (one engine
    call), postprocess (JSON replies)."""
    best = {"preprocess": float("inf"), "inference": float("inf"), "postprocess": float("inf")}
    for _ in range(repeats):
        started = time.perf_counter()
        batch = handler.preprocess(rows)
        parsed = time.perf_counter()
        results = handler.inference(batch)
        inferred = time.perf_counter()
        handler.postprocess(batch, results)
        done = time.perf_counter()
        for name, seconds in (("preprocess", parsed - started), ("inference", inferred - parsed),
                              ("postprocess", done - inferred)):
            best[name] = min(best[name], seconds * 1e3 / len(rows))
    return best


def run(args) -> dict:
    config = CaptionConfig.from_json(args.config) if args.config else PRESETS["seed-full"]
    gpu_id = 0 if args.device.startswith("cuda") else None
    overrides = {"compile_encoder": args.compile, "compile_decode": args.compile, "warmup": args.warmup,
                 "compile_dynamic_rows": args.dynamic_rows,
                 "decode_threads": args.decode_threads}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp)
        context = StubContext(model_dir, gpu_id, make_model_dir(model_dir, Path(args.weights), config, overrides),
                              batch_size=args.batch_size)  # the model's batchSize, as TorchServe passes it
        handler = CaptionHandler()
        started = time.perf_counter()
        handler.initialize(context)
        initialize_s = time.perf_counter() - started
        print(f"initialize (load{', compile and warm up' if args.warmup else ''}): {initialize_s:.1f} s", flush=True)
        images = [base64.b64encode(b).decode() for b in synthetic_jpegs(args.batch_size)]
        rows = [{"body": {"image": image, "max_new_tokens": args.max_new_tokens, "seed": i}} for i, image in enumerate(images)]
        handler.handle(rows, context)  # warm-up (and compilation)
        timings = []
        for _ in range(args.batches):
            start = time.perf_counter()
            replies = handler.handle(rows, context)
            timings.append(time.perf_counter() - start)
        if context.statuses:
            raise SystemExit(f"requests failed: {context.statuses}; first reply: {replies[0]}")
        captions = json.loads(replies[0])
        stages = stage_ms_per_image(handler, rows, args.batches)
    best = min(timings)
    result = {
        "device": args.device, "device_name": torch.cuda.get_device_name(0) if gpu_id is not None else "cpu",
        "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "compile": args.compile,
        "dynamic_rows": args.dynamic_rows, "warmup": args.warmup, "initialize_s": initialize_s,
        "batch_seconds": timings, "images_per_s": args.batch_size / best,
        "captions_per_image": sum(len(v) for v in captions.values()),
        "stage_ms_per_image": stages,
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if gpu_id is not None else None,
    }
    print(f"handler path: batch {args.batch_size}, {result['captions_per_image']} captions/image, "
          f"<= {args.max_new_tokens} tokens: {result['images_per_s']:.1f} images/s (best of {args.batches}; "
          f"target >= 300 on an H100/H200)")
    print("per image, best of each: " + ", ".join(f"{name} {ms:.2f} ms" for name, ms in stages.items()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"handler-{'gpu' if gpu_id is not None else 'cpu'}.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
