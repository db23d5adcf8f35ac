"""Host work of the handler's batched path, each variant next to its baseline in one run.

`python -m bench.host_probe WEIGHTS CONFIG [REQUESTS] [PROCESSES]` prints, in ms (best of 5):
- caption text for 384 rows: `Vocabulary.decode` against its word-by-word reference (64
  random tokens per row), and `tidy_caption` against the same function with its
  space-before-punctuation rule in the replacement-template form it had before (384 dataset
  captions);
- the handler's preprocess of REQUESTS photo-sized JSON requests (uint8 pixels, as a GPU worker
  makes them), wall and the worker process's own CPU per image, three rounds interleaved:
  PROCESSES decode threads; PROCESSES decode processes handing the pixels back pickled through
  the pool's result pipe (before the eighteenth session); and writing them into the worker's
  shared block (`handler/pixel_slots.py`, the handler's way).
"""

from __future__ import annotations

import argparse
import csv
import inspect
import random
import re
import sys
import tempfile
import time
from pathlib import Path

import model.text as text_module
from model.text import tidy_caption
from model.tokenizer import Vocabulary

from .handler_bench import open_handler, request_rows

REPO = Path(__file__).resolve().parents[1]
ROWS, TOKENS, REPEATS = 384, 64, 5


def best_ms(work, repeats: int = REPEATS) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - started)
    return best * 1e3


def dataset_captions(count: int) -> list[str]:
    captions = []
    for style in ("concise", "narrative", "descriptive"):
        with open(REPO / "data" / style / "coco_test.csv", newline="") as handle:
            captions += [row["caption"] for _, row in zip(range(count // 3), csv.DictReader(handle))]
    return captions


def template_form_tidy():
    """`tidy_caption` as it was: the space-before-punctuation rule put the punctuation back
    through a `\\1` template instead of matching it by lookahead."""
    source = inspect.getsource(tidy_caption).replace("def tidy_caption", "def template_tidy").replace(
        '_SPACE_BEFORE_PUNCT.sub("", text)', '_TEMPLATE_RULE.sub(r"\\1", text)')
    namespace = dict(vars(text_module), _TEMPLATE_RULE=re.compile(r"\s+([.,!?;:%)\]])"))
    exec(source, namespace)  # noqa: S102 - this module's own source, one substitution
    return namespace["template_tidy"]


def caption_text_lines() -> list[str]:
    vocab, generator = Vocabulary(), random.Random(0)
    ids = [[generator.randrange(1000, 30000) for _ in range(TOKENS)] for _ in range(ROWS)]
    texts = [vocab.decode(vocab.encode(caption)) for caption in dataset_captions(ROWS)]
    template_tidy = template_form_tidy()
    assert [template_tidy(t) for t in texts] == [tidy_caption(t) for t in texts]
    return [
        f"decode {ROWS} rows x {TOKENS} random ids: word by word "
        f"{best_ms(lambda: [vocab.decode_word_by_word(i) for i in ids]):.1f} ms, "
        f"lookup {best_ms(lambda: [vocab.decode(i) for i in ids]):.1f} ms",
        f"tidy {len(texts)} dataset captions: template rule {best_ms(lambda: [template_tidy(t) for t in texts]):.1f} ms, "
        f"lookahead {best_ms(lambda: [tidy_caption(t) for t in texts]):.1f} ms",
    ]


def pickle_pixels(handler) -> None:
    """The handler without its shared block: its decode processes pickle the pixels back."""
    if handler._pixel_slots is not None:
        handler._pixel_slots.close()
    handler._pixel_slots = None
    handler._ensure_pixel_slots = lambda count: None


def preprocess_lines(weights: str, config: str, requests: int, processes: int, rounds: int = 3) -> list[str]:
    lines = []
    variants = [("threads", 0, None), ("processes, pixels pickled", processes, pickle_pixels),
                ("processes, pixels in shared memory", processes, None)]
    handlers = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, pool_processes, change in variants:
            args = argparse.Namespace(config=config, weights=weights, device="cpu", compile=False, warmup=False,
                                      compile_prefill=False, decode_threads=processes, decode_processes=pool_processes,
                                      dynamic_rows=None, static_layout=None, decode_intra_op_threads=None,
                                      batch_size=requests, max_new_tokens=1, request_form="json", photo_size=(640, 480),
                                      jpeg_draft=None)
            model_dir = Path(tmp) / f"variant-{len(handlers)}"
            model_dir.mkdir()
            handler, _, _ = open_handler(args, model_dir)
            handler.normalize_on_device = True  # uint8 pixels, as a GPU worker makes them
            if change:
                change(handler)
            handlers.append((name, handler))
        rows = request_rows(args)
        try:
            for round_ in range(rounds):
                for name, handler in handlers:
                    failed = handler.preprocess(rows).errors
                    if failed:
                        raise SystemExit(f"{name}: requests failed in preprocess: {failed}")
                    wall, cpu = float("inf"), float("inf")
                    for _ in range(4):
                        started, cpu_started = time.perf_counter(), time.process_time()
                        handler.preprocess(rows)
                        wall = min(wall, time.perf_counter() - started)
                        cpu = min(cpu, time.process_time() - cpu_started)
                    lines.append(f"round {round_}: {name:36s} preprocess {wall * 1e3 / requests:.2f} ms/image, "
                                 f"worker CPU {cpu * 1e3 / requests:.3f} ms/image")
        finally:
            for _, handler in handlers:
                handler._decode_pool.shutdown(wait=True)
                if handler._pixel_slots is not None:
                    handler._pixel_slots.close()
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    weights, config = argv[0], argv[1]
    requests = int(argv[2]) if len(argv) > 2 else 64
    processes = int(argv[3]) if len(argv) > 3 else 2
    for line in caption_text_lines() + preprocess_lines(weights, config, requests, processes):
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
