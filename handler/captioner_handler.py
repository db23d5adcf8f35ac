"""TorchServe handler of the three-style caption model.

One TorchServe batch (up to ``batchSize`` HTTP requests) becomes one call of the caption
engine (more calls of up to ``batchSize`` images when KServe v1 requests bring several images
each). Requests that cannot be parsed, carry invalid options or an unreadable image are
answered 400 with ``{"error": ...}`` while the rest of the batch is still captioned; an
engine call that runs out of memory fails its own images' requests with 507 (any other
failure with 500), the batch's other calls are still answered, and the worker keeps serving.
A KServe v1 request (``{"instances": [...]}``) contributes one image per instance and is
answered ``{"predictions": [...]}`` (``handler/instances.py``). The management API's describe
request (``?customized=true``) gets the worker's facts (``describe_handle``); explanation
requests get 501.

TorchServe requires a handler file to define exactly one class: helpers live in
``handler/batching.py``, ``handler/instances.py``, ``handler/preparation.py``,
``handler/settings.py`` and ``handler/metrics.py``. In the archive this
file sits at the root of the model directory next to the ``model/`` and ``handler/`` packages.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from concurrent.futures import BrokenExecutor, Executor, Future
from dataclasses import asdict, replace
from pathlib import Path

# Inside an extracted archive (a MAR-INF folder beside this file) the packages shipped in the
# archive must win over any installed copy of the project: put the model directory first.
_HERE = Path(__file__).resolve().parent
if (_HERE / "MAR-INF").is_dir() and (not sys.path or sys.path[0] != str(_HERE)):
    sys.path.insert(0, str(_HERE))

# TorchServe's loader takes an ImportError raised while importing this file for "no such
# handler" and tries its built-in handlers instead, reporting "No module named
# 'ts.torch_handler.captioner_handler'": a missing dependency is re-raised as what it is.
try:
    import numpy as np  # noqa: E402
    import torch  # noqa: E402

    from handler import metrics as handler_metrics  # noqa: E402
    from handler.batching import PreparedBatch, is_out_of_memory, reason_phrase  # noqa: E402
    from handler.instances import Answer, expand_instances, merge_answers  # noqa: E402
    from handler.pixel_slots import InSlot, PixelSlots, SlotTarget, make_slots  # noqa: E402
    from handler.preparation import (Preparation, PreparationFailure, failure_of, make_pool,  # noqa: E402
                                     prepare_request, prepare_requests, split_into_tasks, start_processes)
    from handler.request_parsing import error_body  # noqa: E402
    from handler.settings import HandlerSettings  # noqa: E402
    from model.packing import is_packed  # noqa: E402
    from model.quantize import is_quantized  # noqa: E402
    from model.styles import STYLE_DEFAULTS, STYLES  # noqa: E402
except ImportError as exc:
    raise RuntimeError(f"the caption handler cannot import its dependencies ({exc}); install the "
                       "project's requirements in the worker's Python (pyproject.toml)") from exc

logger = logging.getLogger(__name__)

OOM_MESSAGE = "out of memory while captioning this batch; retry later or ask for fewer captions"
STREAM_NEXT_HEADER = "ts_stream_next"  # TorchServe's mark of a streamed reply: "false" = the last one
EXPLAIN_MESSAGE = ("this model gives no explanations; ask for captions at /predictions/<model> "
                   "(KServe: /v1/models/<model>:predict)")


class CaptionHandler:
    """``initialize`` once per worker, then ``handle(data, context)`` once per batch."""

    def __init__(self):
        self.initialized = False
        self.engine = None
        self.settings: HandlerSettings | None = None
        self.limits = None
        self.device = torch.device("cpu")
        self.image_size = 0
        self.build: dict | None = None  # the archive's build_info.json (export/archive.py)
        self.normalize_on_device = False  # decoded images travel as uint8, normalised by the engine
        self.context = None
        self._decode_pool: Executor | None = None
        self.decode_processes = 0  # processes of the decode pool; 0: its threads
        self._pixel_slots: PixelSlots | None = None  # where decode processes put the pixels
        self._slots_refused_at = math.inf  # the smallest block that could not be made
        self.images_per_call = 1  # images per engine call: the model's batchSize
        self.batch_stats: dict | None = None  # the engine's figures for the last batch

    # ------------------------------------------------------------------ start-up
    def initialize(self, context) -> None:
        started = time.perf_counter()
        self.context = context
        props = context.system_properties
        model_dir = Path(props["model_dir"]).resolve()
        self.settings = settings = HandlerSettings.from_model_yaml(getattr(context, "model_yaml_config", None))
        code_dir = _check_code_origin(model_dir)

        self.device = worker_device(props.get("gpu_id"))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.normalize_on_device = self.device.type == "cuda"
        if settings.threads:
            torch.set_num_threads(settings.threads)
        # Reading the count fixes this thread's own: a thread's first parallel op otherwise
        # takes the process default, which the decode threads lower (`limit_intra_op_threads`).
        torch.get_num_threads()
        dtype = settings.dtype_for(self.device)

        from model.engine import CaptionEngine  # the engine, from the same (archive) packages as above

        weights = model_dir / (settings.weights or _serialized_file(context) or "weights.pt")
        self.engine = CaptionEngine.from_files(
            weights,
            config=model_dir / settings.model_config,
            vocab=model_dir / settings.vocab,
            device=self.device,
            dtype=dtype,
            compile_encoder=settings.compiles("compile_encoder", self.device),
            compile_decode=settings.compiles("compile_decode", self.device),
            compile_prefill=settings.compiles("compile_prefill", self.device),
            dynamic_rows=settings.compile_dynamic_rows,
            static_layout=settings.static_layout,
            quantize=settings.cpu_quantize if self.device.type == "cpu" else None,
            prepack=None if settings.cpu_prepack else False,
            compile_step=settings.cpu_compile_decode and self.device.type == "cpu",
        )
        config = self.engine.config
        self.image_size = config.image_size
        self.build = _build_info(model_dir)
        # A request may not ask for more tokens than the model's position table holds.
        self.limits = replace(settings.limits,
                              max_new_tokens=min(settings.limits.max_new_tokens, config.max_text_tokens))
        self.decode_processes = settings.decode_process_count(self.device)
        self._decode_pool = self._new_decode_pool()
        batch_size = int(props.get("batch_size") or 1)
        self.images_per_call = batch_size
        self._ensure_pixel_slots(batch_size)
        loaded = time.perf_counter()
        if settings.warmup:
            # The batch sizes real traffic will use: one request, and a full dynamic batch; CUDA
            # graphs for every row count a full batch within the limits can need.
            self.engine.warmup(batch_sizes=sorted({1, batch_size}),
                               max_rows=batch_size * len(STYLES) * self.limits.max_num_captions)
        logger.info(
            "caption handler ready: model=%s device=%s dtype=%s threads=%d compile_encoder=%s "
            "compile_decode=%s compile_step=%s compile_prefill=%s dynamic_rows=%s static_layout=%s image_size=%d "
            "decode_processes=%d code=%s load=%.1fs warmup=%.1fs torch=%s cuda=%s transformers=%s",
            context.model_name, self.device, str(dtype).removeprefix("torch."), torch.get_num_threads(),
            self.engine.encoder_buckets, self.engine.static_shapes, self.engine.compile_step,
            self.engine.compile_prefill, self.engine.dynamic_rows, self.engine.static_layout, self.image_size,
            self.decode_processes,
            code_dir, loaded - started, time.perf_counter() - loaded,
            torch.__version__, torch.version.cuda, _version_of("transformers"),
        )
        self.initialized = True

    # ------------------------------------------------------------------ one batch
    def handle(self, data, context):
        started = time.perf_counter()
        self.context = context
        if _is_describe(data, context):
            _set_content_type(context, 0)
            return [json.dumps(self.describe_handle())]
        # /explanations/<name> and KServe's :explain arrive as predictions marked explain=True
        refused = {idx: (501, EXPLAIN_MESSAGE) for idx in range(len(data)) if _header(context, idx, "explain") == "True"}
        expansion = expand_instances(data, self.settings.max_instances, refused)
        batch = PreparedBatch(size=len(expansion.rows))
        results: dict[int, dict] = {}
        self.batch_stats = None
        try:
            batch = self.preprocess(expansion.rows)
            batch.drop(expansion.siblings_of_failures(batch.errors))
            results = self.inference(batch, skip=expansion.siblings_of_failures)
        except Exception as exc:  # noqa: BLE001 - one bad batch must not kill the worker
            results = {}
            batch.fail_unanswered(*self._failure(exc, f"a batch of {batch.size} request(s)"))
        # Rows of a v1 request that has a failed instance: not run, or their captions unused.
        skipped = expansion.siblings_of_failures(batch.errors)
        answers = merge_answers(expansion, len(data), self.postprocess(batch, results), skipped, batch.shared)
        responses = [self._respond(idx, status, document) for idx, (status, document) in enumerate(answers)]
        handler_metrics.emit_batch(
            context, batch_size=len(data), requests=len(data), errors=sum(status != 200 for status, _ in answers),
            server_errors=sum(status >= 500 for status, _ in answers),
            decode_ms=batch.decode_ms, stats=self.batch_stats,
            handler_ms=(time.perf_counter() - started) * 1000,
        )
        return responses

    def preprocess(self, data) -> PreparedBatch:
        """Parse, validate, decode and resize every request, each a task of the decode pool
        (`handler/preparation.py`); a request that fails gets its own status and message."""
        batch = PreparedBatch(size=len(data))
        started = time.perf_counter()
        preparation = Preparation(self.limits, self.image_size, self.settings.max_pixels,
                                  uint8=self.normalize_on_device, jpeg_draft=self.settings.jpeg_draft)
        self._ensure_pixel_slots(len(data))
        tasks = [(task, self._submit(data, task, preparation))
                 for task in split_into_tasks(len(data), self.decode_processes)]
        orphaned = [idx for task, future in tasks if not self._collect(batch, task, future) for idx in task]
        for idx in orphaned:  # again, one at a time in a fresh pool: only a request that kills it fails
            try:
                future = self._submit(data, [idx], preparation)
            except Exception as exc:  # noqa: BLE001 - no pool could start: the requests prepared keep their answers
                batch.fail(idx, *self._failure(exc, "starting a decode pool"))
                continue
            if not self._collect(batch, [idx], future):
                logger.error("request %d of the batch killed its decode process", idx)
                batch.fail(idx, 500, "internal error: the image decoding process died on this request")
                self._replace_broken_pool_in_background()
        batch.decode_ms = (time.perf_counter() - started) * 1000
        return batch

    def _collect(self, batch: PreparedBatch, indices, future: Future) -> bool:
        """Record the preparation of one task's requests in `batch`; False if its decode process
        died (a process pool then fails every task it held, and they can be tried again)."""
        try:
            outcomes = future.result()
        except BrokenExecutor:
            return False
        except Exception as exc:  # noqa: BLE001 - e.g. a result that could not be sent back
            outcomes = [failure_of(exc)] * len(indices)
        for idx, outcome in zip(indices, outcomes):
            self._record(batch, idx, outcome)
        return True

    def _record(self, batch: PreparedBatch, idx: int, outcome) -> None:
        """One request's (plan, pixels), or its `PreparationFailure`, into `batch`."""
        if isinstance(outcome, PreparationFailure):
            batch.fail(idx, outcome.status, outcome.message)
            return
        plan, pixels = outcome
        if isinstance(pixels, InSlot):
            try:
                pixels = self._pixel_slots.take(pixels)
            except Exception as exc:  # noqa: BLE001 - a block replaced under the task: this request alone
                logger.error("request %d: %s", idx, exc)
                batch.fail(idx, 500, "internal error: the decoded image was lost on its way back")
                return
        batch.good.append(idx)
        batch.plans.append(plan)
        batch.pixels.append(torch.from_numpy(pixels))

    def _submit(self, data: list, indices, preparation: Preparation) -> Future:
        """One task (the requests `indices` of `data`) to the decode pool; a broken pool (a process
        died) is replaced first."""
        rows = [data[idx] for idx in indices]
        slots = SlotTarget(self._pixel_slots.layout, tuple(indices)) if self._pixel_slots else None
        try:
            return self._decode_pool.submit(prepare_requests, rows, preparation, prepare_request, slots)
        except BrokenExecutor:
            self._replace_decode_pool(wait=True)  # a pool that cannot start fails here, not the request
            return self._decode_pool.submit(prepare_requests, rows, preparation, prepare_request, slots)

    def _ensure_pixel_slots(self, count: int) -> None:
        """A shared block with a slot for each of `count` requests, for decode processes (threads
        hand their arrays over as they are). Made or grown only between batches, never while a
        task may still write to the block in hand."""
        if not self.decode_processes:
            return
        shape = (3, self.image_size, self.image_size)
        dtype = np.uint8 if self.normalize_on_device else np.float32
        if self._pixel_slots is not None and self._pixel_slots.fits(count, shape, dtype):
            return
        count = max(count, self.images_per_call)
        if count >= self._slots_refused_at:  # no block this large could be made: not tried (nor logged) again
            return
        grown = make_slots(count, shape, dtype)
        if grown is None:  # logged; the pixels travel pickled, the block in hand (if any) stays for smaller batches
            self._slots_refused_at = count
            return
        if self._pixel_slots is not None:
            self._pixel_slots.close()
        self._pixel_slots = grown

    def _replace_decode_pool(self, wait: bool) -> None:
        """A new pool for a broken one (a process died)."""
        self._decode_pool.shutdown(wait=False, cancel_futures=True)
        self._decode_pool = self._new_decode_pool(wait)

    def _replace_broken_pool_in_background(self) -> None:
        """After a retried request killed its pool: a new one now, its processes starting in the
        background (the next retry, or the next batch, queues behind them). If even starting fails
        (no memory, no file descriptors), the broken pool stays and the next `_submit` tries again:
        the requests already prepared keep their answers."""
        try:
            self._replace_decode_pool(wait=False)
        except Exception:  # noqa: BLE001 - logged; the answers of this batch stand
            logger.error("could not start a new decode pool; the next batch tries again", exc_info=True)

    def _new_decode_pool(self, wait: bool = True) -> Executor:
        settings = self.settings
        pool = make_pool(self.decode_processes, settings.decode_threads, settings.decode_intra_op_threads)
        if self.decode_processes:
            try:
                start_processes(pool, self.decode_processes, wait)
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)  # whatever did start ends with it
                raise
            logger.info("decode pool of %d processes %s", self.decode_processes, "started" if wait else "starting")
        return pool

    def inference(self, batch: PreparedBatch, skip=lambda errors: ()) -> dict[int, dict]:
        """Captions by batch index for the images that survived preprocessing: one engine call
        per `images_per_call` images (batchSize: what warm-up prepared for; KServe v1 requests
        can bring more images than requests). A call that fails fails only its own images (507
        out of memory, 500 otherwise): earlier calls' captions are kept and the next call runs,
        without the images `skip(batch.errors)` names (a failed v1 request's other instances)."""
        results: dict[int, dict] = {}
        stats = []
        skipped: set[int] = set()  # grows only when a call fails
        pixels = batch.pixel_values()
        with torch.inference_mode():
            for start in range(0, len(batch.good), self.images_per_call):
                keep = [k for k in range(start, min(start + self.images_per_call, len(batch.good)))
                        if batch.good[k] not in skipped]
                if not keep:
                    continue
                indices = [batch.good[k] for k in keep]
                contiguous = len(keep) == keep[-1] - keep[0] + 1  # a view, no copy, unless rows were skipped
                images = pixels[keep[0]:keep[-1] + 1] if contiguous else pixels[keep]
                try:
                    captions = self.engine.caption(images, [batch.plans[k] for k in keep])
                    if len(captions) != len(indices):
                        raise RuntimeError(f"engine returned {len(captions)} results for {len(indices)} images")
                except Exception as exc:  # noqa: BLE001 - the other calls' images are still served
                    batch.fail_shared(indices, *self._failure(exc, f"an engine call of {len(indices)} image(s)"))
                    skipped = set(skip(batch.errors))
                    continue
                results.update(zip(indices, captions))
                stats.append(self.engine.last_stats)
        self.batch_stats = sum_stats(stats) if stats else None
        return results

    def _failure(self, exc: Exception, what: str) -> tuple[int, str]:
        """(status, message) for the requests a failure of `what` leaves unanswered; logs it and,
        after running out of memory, returns the allocator's cached blocks."""
        if is_out_of_memory(exc):
            logger.error("out of memory in %s", what, exc_info=True)
            self._release_memory()
            return 507, OOM_MESSAGE
        logger.error("%s failed", what, exc_info=True)
        return 500, f"internal error while captioning ({type(exc).__name__})"

    def postprocess(self, batch: PreparedBatch, results: dict[int, dict]) -> list[Answer]:
        """(status, JSON document) for every image of the batch, in batch order."""
        answers = []
        for idx in range(batch.size):
            if idx in batch.errors or idx not in results:
                status, message = batch.errors.get(idx, (500, "no result for this request"))
                answers.append((status, {"error": message}))
            else:
                answers.append((200, results[idx]))
        return answers

    def _respond(self, idx: int, status: int, document: dict) -> str:
        """Request `idx`'s reply: its status and content type set on the context, the JSON text."""
        _set_content_type(self.context, idx)
        if _over_grpc(self.context, idx):
            # gRPC StreamPredictions: this one reply ends the stream. Without the mark TorchServe
            # 0.12's frontend fails on the reply (a NullPointerException) and restarts the worker.
            self.context.set_response_header(idx, STREAM_NEXT_HEADER, "false")
        if status == 200:
            text = json.dumps(document, ensure_ascii=False)
            size = len(text.encode("utf-8"))
            if size <= MAX_REPLY_BYTES:
                return text
            status, document = 400, {"error": f"the answer ({size:,} bytes) would exceed the server's response "
                                              "limit; ask for fewer instances, captions or tokens"}
        self.context.set_response_status(status, reason_phrase(status), idx)
        return _error_json(document["error"])

    def describe_handle(self) -> dict:
        """The management API's `customizedMetadata` (`GET /models/<name>?customized=true`):
        what this worker accepts and how it runs the model."""
        engine = self.engine
        return {
            "styles": {style: {"num_captions": defaults.num_captions, **asdict(defaults.sampling)}
                       for style, defaults in STYLE_DEFAULTS.items()},
            "limits": asdict(self.limits),
            "max_instances": self.settings.max_instances,
            "images_per_engine_call": self.images_per_call,
            "device": str(self.device),
            "decode_pool": {"processes": self.decode_processes, "shared_memory": self._pixel_slots is not None}
            if self.decode_processes else {"threads": self.settings.decode_threads},
            "dtype": str(engine.dtype).removeprefix("torch."),
            "packed_decoder": is_packed(engine.model),
            "int8_decoder": is_quantized(engine.model),
            "compiled": {"encoder": bool(engine.encoder_buckets), "decode": bool(engine.static_shapes),
                         "decode_step": engine.compile_step, "prefill": bool(engine.compile_prefill)},
            "model_config": asdict(engine.config),
            "build": self.build,
        }

    def _release_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def sum_stats(stats: list[dict]) -> dict:
    """The engine's per-call figures (stage milliseconds, rows, tokens) added over several calls."""
    keys = {key for one in stats for key, value in one.items() if isinstance(value, (int, float))}
    return {key: sum(one.get(key) or 0 for one in stats) for key in keys}


# Below config.properties' max_response_size (1 MiB): a longer reply is dropped by the frontend,
# which then fails the whole batch and restarts the worker.
MAX_REPLY_BYTES = 1_000_000
MAX_ERROR_CHARS = 1000  # a message never carries a request's bulk back (responses are capped at 1 MiB)


def _error_json(message: str) -> str:
    if len(message) > MAX_ERROR_CHARS:
        message = message[: MAX_ERROR_CHARS - 3] + "..."
    return error_body(message)


def _request_headers(context, idx: int) -> dict | None:
    """Request `idx`'s headers as the worker passed them (None outside a worker's batch)."""
    if getattr(context, "request_processor", None) is None:
        return None
    return context.get_all_request_header(idx)


def _build_info(model_dir: Path) -> dict | None:
    """The archive's build record (`export/archive.py`: weights sha256, code commit, versions),
    logged once; None for a model directory without one."""
    path = model_dir / "build_info.json"
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        logger.info("no readable %s in the model directory: build unknown", path.name)
        return None
    logger.info("archive build: weights %s sha256 %s, code %s%s", info.get("weights_file"), info.get("weights_sha256"),
                info.get("code_commit"), " (with uncommitted changes)" if info.get("code_modified") else "")
    return info


def _version_of(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def worker_device(gpu_id) -> torch.device:
    """The device TorchServe gave this worker: `gpu_id` (set when number_of_gpu > 0 and it found
    NVIDIA GPUs), else the CPU. A GPU that PyTorch cannot use is an error, not a silent CPU
    worker that answers /ping as healthy and captions a hundred times slower."""
    if gpu_id is None:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"TorchServe assigned GPU {gpu_id} to this worker, but PyTorch {torch.__version__} cannot use CUDA "
            f"(built for CUDA {torch.version.cuda or 'none: a CPU-only build'}; is the NVIDIA driver older than that "
            "build needs?). Install a PyTorch build for this driver, or set number_of_gpu=0 in config.properties "
            "to serve on the CPU.")
    if int(gpu_id) >= torch.cuda.device_count():
        raise RuntimeError(f"TorchServe assigned GPU {gpu_id} to this worker, but PyTorch sees "
                           f"{torch.cuda.device_count()} GPU(s): number_of_gpu is larger than the GPUs visible")
    return torch.device(f"cuda:{int(gpu_id)}")


def _is_describe(data, context) -> bool:
    """GET /models/<name>?customized=true: one request, no input, marked describe=True. The
    frontend also passes a prediction's own HTTP headers through, so the mark alone could come
    from a client; a prediction always has input, and may share its batch."""
    return len(data) == 1 and not data[0] and _header(context, 0, "describe") == "True"


def _header(context, idx: int, name: str) -> str | None:
    """A header of request `idx` (TorchServe's own `describe` and `explain` marks too)."""
    return (_request_headers(context, idx) or {}).get(name)


def _over_grpc(context, idx: int) -> bool:
    """Whether request `idx` came through TorchServe's gRPC API: it carries no HTTP header, only
    the per-input content-type entries (dicts). Over REST the frontend passes the request's
    HTTP headers (Host at least), and must not get the stream mark (it would end a stream
    that was never started)."""
    headers = _request_headers(context, idx)
    return headers is not None and not any(isinstance(value, str) for value in headers.values())


def _set_content_type(context, idx: int) -> None:
    if _request_headers(context, idx) is not None:
        context.set_response_content_type(idx, "application/json")


def _serialized_file(context) -> str | None:
    manifest = getattr(context, "manifest", None) or {}
    return (manifest.get("model") or {}).get("serializedFile")


def _check_code_origin(model_dir: Path) -> str:
    """From an archive, the `model` and `handler` packages must be the archive's own copies."""
    import handler as handler_pkg
    import model as model_pkg

    origins = {name: Path(next(iter(pkg.__path__))).resolve() for name, pkg in
               (("model", model_pkg), ("handler", handler_pkg))}
    if (model_dir / "MAR-INF").is_dir():
        stray = {name: str(path) for name, path in origins.items() if model_dir not in path.parents}
        if stray:
            raise RuntimeError(f"packages not loaded from the model archive {model_dir}: {stray}; "
                               "another copy on PYTHONPATH shadows them")
    return str(origins["model"].parent)
