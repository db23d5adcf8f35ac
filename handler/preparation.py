"""The per-request work of a batch: one TorchServe row -> (caption plan, pixels).

Parsing the row (base64 included), validating its options, decoding the image and resizing
it run in the handler's decode pool, so that requests overlap. The pool is threads
(`handler.decode_threads`, one request per task) or, with `handler.decode_processes`,
processes (a batch's requests split into one task per process: each task costs the worker
about 0.2 ms of its own CPU to send and collect): about 1 ms per photo-sized request holds
Python's GIL (base64 in binascii, Pillow's pixel copy, Python overhead), which threads take in
turn however many cores the host has. Everything a task needs is a module-level function of
picklable arguments, so both pools run the same code.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from handler.pixel_slots import SlotTarget, write_slot
from handler.request_parsing import TEXT_HINT, ParsedRequest, parse_request
from model.image import ImageError, decode_image, to_pixel_values, to_uint8_pixels
from model.styles import CaptionPlan, Limits, make_plan


logger = logging.getLogger(__name__)

PARENT_POLL_SECONDS = 1.0  # how often a decode process checks that its worker still exists
# Most decode processes a worker starts by itself (`handler.decode_processes: gpu`): 15 were
# measured on a 16-core H100 host, and each process costs ~236 MB of host memory.
MAX_GPU_DECODE_PROCESSES = 16

# What a MemoryError says about where it happened (the handler's 507 message ends with it).
READING = "while reading the request"
DECODING = "while decoding the image"


@dataclass(frozen=True)
class Preparation:
    """What a task needs besides the row: the request limits and the image settings."""

    limits: Limits
    image_size: int
    max_pixels: int
    # uint8 pixels for a GPU worker, whose engine normalises the batch on the device; else
    # normalised float32, here in the pool (faster than one batched normalisation on a CPU).
    uint8: bool
    # Large JPEGs decoded at a reduced scale by libjpeg (`handler.jpeg_draft`).
    jpeg_draft: bool = False


def prepare_request(row, preparation: Preparation) -> tuple[CaptionPlan, np.ndarray]:
    """Parse, validate, decode and resize one request: its plan and pixels (3, S, S), as a
    numpy array (`torch.from_numpy` shares it): from a process it pickles as plain bytes, where
    a tensor would go through a shared-memory file and a socket per image (5x the worker's CPU
    time per image, measured). Raises RequestError, OptionError or ImageError (all ValueError:
    HTTP 400), MemoryError (507), anything else (500)."""
    try:
        request = parse_request(row)
    except MemoryError as error:  # a large JSON or base64 body under memory pressure
        raise MemoryError(READING) from error
    plan = make_plan(request.options, preparation.limits)
    try:
        image = decode_request_image(request, preparation.max_pixels,
                                     preparation.image_size if preparation.jpeg_draft else None)
        if preparation.uint8:
            return plan, to_uint8_pixels(image, preparation.image_size).numpy()
        return plan, to_pixel_values(image, preparation.image_size).numpy()
    except MemoryError as error:
        raise MemoryError(DECODING) from error


def decode_request_image(request: ParsedRequest, max_pixels: int, draft_to: int | None = None):
    """`decode_image`; refusing an image that arrived as text, it says what to send instead."""
    try:
        return decode_image(request.image, max_pixels, draft_to)
    except ImageError as error:
        if not request.sent_as_text:
            raise
        raise ImageError(f"{error}; {TEXT_HINT}") from error


@dataclass(frozen=True)
class PreparationFailure:
    """A request whose preparation failed: its HTTP status and message, as plain values (what a
    decode process sends back: an exception object might not pickle, or not unpickle, and
    would then fail its whole task or look like a dead process)."""

    status: int
    message: str


def failure_of(error: BaseException) -> PreparationFailure:
    """The status and message of a request whose preparation raised `error`."""
    if isinstance(error, (ValueError, OSError)):  # Request/Option/ImageError, or an unwrapped Pillow error
        return PreparationFailure(int(getattr(error, "status", 400)), message_of(error))
    if isinstance(error, MemoryError):  # says where: READING or DECODING
        return PreparationFailure(507, f"out of memory {error or 'while preparing the request'}")
    logger.error("request preparation failed unexpectedly", exc_info=error)
    return PreparationFailure(500, f"internal error while decoding the image ({type(error).__name__})")


def message_of(error: BaseException) -> str:
    message = getattr(error, "message", None)
    return str(message if isinstance(message, str) and message else error) or type(error).__name__


def prepare_requests(rows: list, preparation: Preparation, prepare=prepare_request,
                     slots: SlotTarget | None = None) -> list:
    """`prepare` for each row of one task: its result, or its `PreparationFailure` (a value, so
    that one bad request does not fail the others of its task). With `slots` (a decode process
    and the worker's shared block) each result's pixels are written to the request's slot and
    the result carries an `InSlot` in their place."""
    outcomes = []
    for k, row in enumerate(rows):
        try:
            outcome = prepare(row, preparation)
        except Exception as error:  # noqa: BLE001 - MemoryError included: each request gets its own status
            outcome = failure_of(error)
        if slots is not None and not isinstance(outcome, PreparationFailure):
            plan, pixels = outcome
            try:
                outcome = plan, write_slot(slots.layout, slots.indices[k], pixels)
            except Exception as error:  # noqa: BLE001 - the worker's side failed, not the request
                outcome = PreparationFailure(500, "internal error: the decoded image could not be handed back "
                                                  f"({message_of(error)})")
        outcomes.append(outcome)
    return outcomes


def split_into_tasks(count: int, processes: int) -> list[range]:
    """Request indices 0..count-1 in tasks: one per request for threads (processes 0), else one
    contiguous run per process, as even as possible."""
    if not processes:
        return [range(i, i + 1) for i in range(count)]
    tasks = min(count, processes) or 1
    bounds = [count * task // tasks for task in range(tasks + 1)]
    return [range(bounds[t], bounds[t + 1]) for t in range(tasks) if bounds[t + 1] > bounds[t]]


def limit_intra_op_threads(threads: int) -> None:
    """Pool initializer: this thread's (or process's) PyTorch intra-op thread count (0: unchanged).

    In a thread, `torch.set_num_threads` also sets the default of threads that have not yet
    run a parallel op; the worker's own thread fixes its count first (the handler's
    `initialize`), so it is not affected.
    """
    if threads:
        torch.set_num_threads(threads)


def start_decode_process(intra_op_threads: int, parent: int) -> None:
    """Process-pool initializer: the intra-op thread count, and a watchdog that ends this
    process once `parent` (the TorchServe worker) is gone. A worker is stopped with a signal
    (unregistering, scaling down, a crash), which leaves no chance to shut its pool down."""
    limit_intra_op_threads(intra_op_threads)
    threading.Thread(target=exit_when_orphaned, args=(parent,), name="parent-watchdog", daemon=True).start()


def exit_when_orphaned(parent: int, interval: float = PARENT_POLL_SECONDS) -> None:
    while os.getppid() == parent:
        time.sleep(interval)
    os._exit(0)


def process_id(_task: int) -> int:
    return os.getpid()


def start_processes(pool: Executor, processes: int, wait: bool = True) -> None:
    """Start a process pool's processes now (each spawn takes about a second) rather than on
    a first batch: a process pool spawns one per task submitted while none is idle. Without
    `wait` they start in the background (the next tasks queue behind them)."""
    started = [pool.submit(process_id, task) for task in range(processes)]
    if wait:
        for future in started:
            future.result()


def gpu_decode_processes(cores: int, gpus: int) -> int:
    """Decode processes of a GPU worker: its share of the host's cores (one worker per visible
    GPU) less one for the worker itself, at least 1, at most MAX_GPU_DECODE_PROCESSES."""
    return max(1, min(MAX_GPU_DECODE_PROCESSES, cores // max(1, gpus) - 1))


def make_pool(processes: int, threads: int, intra_op_threads: int) -> Executor:
    """`processes` > 0: a process pool (spawned: a forked child of a CUDA process is unsafe);
    else `threads` threads. Each runs torch with `intra_op_threads` (a process: at least 1)."""
    if processes:
        return ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=start_decode_process, initargs=(intra_op_threads or 1, os.getpid()))
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="caption-decode",
                              initializer=limit_intra_op_threads, initargs=(intra_op_threads,))
