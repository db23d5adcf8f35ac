"""Throughput of the handler's batched path (parse, decode, preprocess, one engine call, JSON).

Drives `handler.captioner_handler.CaptionHandler` directly with a minimal stand-in for
TorchServe's context, so it runs where TorchServe is not installed (a GPU box): each batch
is what a worker receives from the frontend's dynamic batching, JSON requests with base64
images. Prints images/s and the milliseconds per image of each handler stage; writes
`<out>/handler-<device>.json`. With `--workers N`, N handler processes share the device as
TorchServe's workers would (one decodes images while another runs the model): the images/s
of all of them together, in `<out>/handler-<device>-<N>workers.json`.
"""

from __future__ import annotations

import base64
import json
import multiprocessing
import queue
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
    (path / "model" / "assets").mkdir(parents=True)  # the vocabulary where the archive has it
    (path / "model" / "assets" / "vocab.txt").symlink_to(REPO / "model" / "assets" / "vocab.txt")
    model_yaml = yaml.safe_load((REPO / "handler" / "model-config.yaml").read_text())
    model_yaml["handler"].update(handler_overrides)
    return model_yaml


def stage_ms_per_image(handler: CaptionHandler, rows: list[dict], repeats: int) -> dict[str, float]:
    """The handler's three stages timed apart (best of `repeats`), in ms per image:
    preprocess (parse, base64, decode and resize in the decode pool), inference (one engine
    call), postprocess (JSON replies); and the worker process's own CPU time in preprocess."""
    best = {"preprocess": float("inf"), "inference": float("inf"), "postprocess": float("inf"),
            "preprocess_worker_cpu": float("inf")}
    for _ in range(repeats):
        started, cpu_started = time.perf_counter(), time.process_time()
        batch = handler.preprocess(rows)
        parsed = time.perf_counter()
        # CPU time of the worker process itself (all its threads; not of decode processes): with
        # threads all of the preprocessing, with decode_processes what feeding them costs.
        best["preprocess_worker_cpu"] = min(best["preprocess_worker_cpu"],
                                            (time.process_time() - cpu_started) * 1e3 / len(rows))
        results = handler.inference(batch)
        inferred = time.perf_counter()
        handler.postprocess(batch, results)
        done = time.perf_counter()
        for name, seconds in (("preprocess", parsed - started), ("inference", inferred - parsed),
                              ("postprocess", done - inferred)):
            best[name] = min(best[name], seconds * 1e3 / len(rows))
    return best


def open_handler(args, model_dir: Path) -> tuple[CaptionHandler, StubContext, float]:
    """A handler initialised in `model_dir` as a TorchServe worker would be: (handler, context,
    initialize seconds)."""
    config = CaptionConfig.from_json(args.config) if args.config else PRESETS["seed-full"]
    gpu_id = 0 if args.device.startswith("cuda") else None
    overrides = {"compile_encoder": args.compile, "compile_decode": args.compile, "warmup": args.warmup,
                 "compile_prefill": args.compile and args.compile_prefill,
                 "decode_threads": args.decode_threads}
    if args.decode_processes is not None:
        overrides["decode_processes"] = args.decode_processes
    if args.jpeg_draft is not None:
        overrides["jpeg_draft"] = args.jpeg_draft
    if args.dynamic_rows is not None:
        overrides["compile_dynamic_rows"] = args.dynamic_rows
    if args.static_layout is not None:
        overrides["static_layout"] = args.static_layout
    if args.decode_intra_op_threads is not None:
        overrides["decode_intra_op_threads"] = args.decode_intra_op_threads
    context = StubContext(model_dir, gpu_id, make_model_dir(model_dir, Path(args.weights), config, overrides),
                          batch_size=args.batch_size)  # the model's batchSize, as TorchServe passes it
    handler = CaptionHandler()
    started = time.perf_counter()
    handler.initialize(context)
    return handler, context, time.perf_counter() - started


def request_rows(args) -> list[dict]:
    """The batch's rows as TorchServe's worker hands them over: JSON bodies with base64 images,
    or (`--request-form raw`) the JPEG bytes as the body with the options as query parameters
    (what `curl -T img.jpg '.../models/captioner/invoke?max_new_tokens=64'` sends)."""
    jpegs = synthetic_jpegs(args.batch_size, size=args.photo_size)
    if args.request_form == "raw":
        return [{"body": bytearray(jpeg), "max_new_tokens": bytearray(str(args.max_new_tokens).encode()),
                 "seed": bytearray(str(i).encode())} for i, jpeg in enumerate(jpegs)]
    return [{"body": {"image": base64.b64encode(jpeg).decode(), "max_new_tokens": args.max_new_tokens, "seed": i}}
            for i, jpeg in enumerate(jpegs)]


def timed_batches(handler: CaptionHandler, context: StubContext, rows: list[dict], batches: int):
    """(start, end) perf_counter pairs of `batches` calls of `handle`, and the last replies."""
    spans, replies = [], []
    for _ in range(batches):
        start = time.perf_counter()
        replies = handler.handle(rows, context)
        spans.append((start, time.perf_counter()))
    if context.statuses:
        raise SystemExit(f"requests failed: {context.statuses}; first reply: {replies[0]}")
    return spans, replies


def run(args) -> dict:
    if args.workers > 1:
        return run_workers(args)
    gpu_id = 0 if args.device.startswith("cuda") else None
    with tempfile.TemporaryDirectory() as tmp:
        handler, context, initialize_s = open_handler(args, Path(tmp))
        pool = (f"{handler.decode_processes} decode processes" if handler.decode_processes
                else f"{handler.settings.decode_threads} decode threads")
        print(f"initialize (load{', compile and warm up' if args.warmup else ''}): {initialize_s:.1f} s; {pool}",
              flush=True)
        rows = request_rows(args)
        handler.handle(rows, context)  # warm-up (and compilation)
        spans, replies = timed_batches(handler, context, rows, args.batches)
        timings = [end - start for start, end in spans]
        captions = json.loads(replies[0])
        stages = stage_ms_per_image(handler, rows, args.batches)
    best = min(timings)
    result = {
        "device": args.device, "device_name": torch.cuda.get_device_name(0) if gpu_id is not None else "cpu",
        "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "compile": args.compile,
        "dynamic_rows": handler.engine.dynamic_rows, "static_layout": handler.engine.static_layout,
        "warmup": args.warmup, "initialize_s": initialize_s,
        "compile_prefill": handler.engine.compile_prefill,
        "decode_threads": args.decode_threads, "decode_processes": handler.decode_processes,
        "decode_intra_op_threads": handler.settings.decode_intra_op_threads, "request_form": args.request_form,
        "photo_size": list(args.photo_size), "jpeg_draft": handler.settings.jpeg_draft,
        "batch_seconds": timings, "images_per_s": args.batch_size / best,
        "captions_per_image": sum(len(v) for v in captions.values()),
        "stage_ms_per_image": stages,
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if gpu_id is not None else None,
    }
    print(f"handler path: batch {args.batch_size}, {result['captions_per_image']} captions/image, "
          f"<= {args.max_new_tokens} tokens: {result['images_per_s']:.1f} images/s (best of {args.batches}; "
          f"target >= 300 on an H100/H200)")
    print("per image, best of each: " + ", ".join(f"{name} {ms:.2f} ms" for name, ms in stages.items()))
    return write_result(args, result)


def write_result(args, result: dict) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"handler-{'gpu' if args.device.startswith('cuda') else 'cpu'}"
    if args.workers > 1:
        stem += f"-{args.workers}workers"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


# ---------------------------------------------------------------------- several workers
def worker_main(args, index: int, ready, results) -> None:
    """One worker process: initialise, compile on a first batch, wait for the others, then time
    `args.batches` batches; puts (index, initialize_s, spans) on `results`."""
    try:
        with tempfile.TemporaryDirectory() as tmp:
            handler, context, initialize_s = open_handler(args, Path(tmp))
            rows = request_rows(args)
            handler.handle(rows, context)
            ready.wait()
            spans, _ = timed_batches(handler, context, rows, args.batches)
        results.put((index, initialize_s, spans, None))
    except BaseException as error:  # noqa: BLE001 - reported by the parent
        results.put((index, 0.0, [], repr(error)))
        ready.abort()


def collect_reports(processes, results, ready=None) -> list[tuple]:
    """One report per worker; a worker that died without one (a crash) is reported as failed,
    and `ready` (the start barrier) is broken so that the others stop waiting for it."""
    reports: dict[int, tuple] = {}
    while len(reports) < len(processes):
        try:
            report = results.get(timeout=5)
            reports[report[0]] = report
        except queue.Empty:
            for index, process in enumerate(processes):
                if index not in reports and not process.is_alive() and results.empty():
                    reports[index] = (index, 0.0, [], f"worker exited with code {process.exitcode}")
                    if ready is not None:
                        ready.abort()
    for process in processes:
        process.join()
    return list(reports.values())


def run_workers(args) -> dict:
    """`args.workers` handler processes on the same device, as TorchServe runs `min_worker` of
    them: each batch is handled by one process while the others decode images or run theirs.
    Images/s = all timed images / (last batch end - first batch start)."""
    context = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
    ready, results = context.Barrier(args.workers), context.Queue()
    processes = [context.Process(target=worker_main, args=(args, i, ready, results)) for i in range(args.workers)]
    for process in processes:
        process.start()
    reports = sorted(collect_reports(processes, results, ready))
    failures = [error for *_, error in reports if error]
    if failures:
        raise SystemExit(f"a worker failed: {failures}")
    starts = [start for _, _, spans, _ in reports for start, _ in spans]
    ends = [end for _, _, spans, _ in reports for _, end in spans]
    wall = max(ends) - min(starts)
    images = args.workers * args.batches * args.batch_size
    result = {
        "device": args.device, "workers": args.workers, "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens, "compile": args.compile, "dynamic_rows": args.dynamic_rows,
        "static_layout": args.static_layout,
        "compile_prefill": args.compile and args.compile_prefill,
        "decode_threads": args.decode_threads, "decode_processes": args.decode_processes,
        "decode_intra_op_threads": args.decode_intra_op_threads,
        "batches_per_worker": args.batches, "initialize_s": [init for _, init, _, _ in reports],
        "batch_seconds": [[end - start for start, end in spans] for _, _, spans, _ in reports],
        "wall_seconds": wall, "images_per_s": images / wall,
    }
    print(f"handler path, {args.workers} workers on one device: batch {args.batch_size}, "
          f"<= {args.max_new_tokens} tokens: {result['images_per_s']:.1f} images/s "
          f"({images} images in {wall:.2f} s; target >= 300 on an H100/H200)")
    return write_result(args, result)
