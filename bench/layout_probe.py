"""Microbenchmarks of decode-step building blocks on CUDA, to choose between layouts.

`python -m bench.layout_probe` prints, for 12 layers captured in one CUDA graph (bf16):
- attention of one decode query per row over a static cache: per-row copies of the image
  prefix at the full length (276 positions), per-row copies sized to the token cap, and an
  image-major layout (each image's prefix stored once, its six rows as six queries over the
  prefix plus all six rows' own positions under a mask);
- q/k/v as three Linears or one, feature/gate as two or one;
- the top-64 candidates of (rows, 30522) logits: one `topk`, or the top 64 of each of 32
  chunks first and then of those 2048 (same values; ties may come in another order).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

LAYERS, HEADS, HEAD_DIM, PREFIX, DIM, HIDDEN, VOCAB = 12, 12, 64, 146, 768, 3072, 30522
CANDIDATES, CHUNKS = 64, 32
ROWS_PER_IMAGE = 6
DTYPE, DEVICE = torch.bfloat16, "cuda"


def graph_ms(fn, replays: int = 50) -> float:
    """Milliseconds per replay of a CUDA graph that captured `fn()`."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(replays):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / replays * 1e3


def attention_ms(batch: int, queries: int, length: int, mask: torch.Tensor) -> float:
    q = torch.randn(batch, HEADS, queries, HEAD_DIM, dtype=DTYPE, device=DEVICE)
    keys = [torch.randn(batch, HEADS, length, HEAD_DIM, dtype=DTYPE, device=DEVICE) for _ in range(LAYERS)]
    values = [torch.randn_like(k) for k in keys]
    return graph_ms(lambda: [F.scaled_dot_product_attention(q, k, v, attn_mask=mask) for k, v in zip(keys, values)])


def image_major_mask(own_len: int) -> torch.Tensor:
    """(S, P + S * own_len): every row sees the prefix and its own block, up to near its end."""
    position = torch.arange(PREFIX + ROWS_PER_IMAGE * own_len, device=DEVICE)
    own = position - PREFIX
    same_row = own.div(own_len, rounding_mode="floor") == torch.arange(ROWS_PER_IMAGE, device=DEVICE)[:, None]
    return (position < PREFIX) | (same_row & (own % own_len <= own_len - 10))


def attention_layouts() -> None:
    print("attention, 12 layers in one CUDA graph, ms per replay")
    for images in (11, 64):
        rows = images * ROWS_PER_IMAGE
        for cap in (64, 128):
            full, sized, own = PREFIX + 2 + 128, PREFIX + 1 + cap, 1 + cap
            figures = {
                f"per-row {full}": attention_ms(rows, 1, full, (torch.arange(full, device=DEVICE) <= full - 10)[None]),
                f"per-row {sized}": attention_ms(rows, 1, sized, (torch.arange(sized, device=DEVICE) <= sized - 10)[None]),
                f"image-major {PREFIX + ROWS_PER_IMAGE * own}": attention_ms(
                    images, ROWS_PER_IMAGE, PREFIX + ROWS_PER_IMAGE * own, image_major_mask(own)),
            }
            print(f"  {rows} rows ({images} images), cap {cap}: " + ", ".join(f"{k} {v:.3f}" for k, v in figures.items()))


def linears_ms(x: torch.Tensor, shapes: list[tuple[int, int]], bias: bool) -> float:
    layers = [[nn.Linear(i, o, bias=bias, device=DEVICE, dtype=DTYPE) for i, o in shapes] for _ in range(LAYERS)]
    return graph_ms(lambda: [[linear(x) for linear in block] for block in layers])


@torch.inference_mode()
def projections() -> None:
    print("projections, 12 layers in one CUDA graph, ms per replay")
    for rows in (8, 64, 384):
        x = torch.randn(rows, 1, DIM, dtype=DTYPE, device=DEVICE)
        qkv = linears_ms(x, [(DIM, DIM)] * 3, False), linears_ms(x, [(DIM, 3 * DIM)], False)
        feature_gate = linears_ms(x, [(DIM, HIDDEN)] * 2, True), linears_ms(x, [(DIM, 2 * HIDDEN)], True)
        print(f"  {rows} rows: q/k/v 3 GEMMs {qkv[0]:.3f} vs 1 {qkv[1]:.3f}; "
              f"feature/gate 2 GEMMs {feature_gate[0]:.3f} vs 1 {feature_gate[1]:.3f}")


def chunked_topk(logits: torch.Tensor, k: int, chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top k of each row via the top k of each of `chunks` slices (padded with -inf)."""
    rows, vocab = logits.shape
    width = -(-vocab // chunks)
    padded = F.pad(logits, (0, chunks * width - vocab), value=float("-inf")).view(rows, chunks, width)
    values, index = padded.topk(k, dim=-1)  # (rows, chunks, k)
    index = index + torch.arange(chunks, device=logits.device)[:, None] * width
    best, where = values.flatten(1).topk(k, dim=-1)
    return best, index.flatten(1).gather(1, where)


@torch.inference_mode()
def top_candidates() -> None:
    print(f"top-{CANDIDATES} of {VOCAB} logits, one CUDA graph, ms per replay")
    for rows in (8, 64, 384):
        logits = torch.randn(rows, VOCAB, device=DEVICE)
        assert torch.equal(chunked_topk(logits, CANDIDATES, CHUNKS)[0], logits.topk(CANDIDATES)[0])
        one = graph_ms(lambda: logits.topk(CANDIDATES))
        two = graph_ms(lambda: chunked_topk(logits, CANDIDATES, CHUNKS))
        print(f"  {rows} rows: topk {one:.3f}, {CHUNKS} chunks then topk {two:.3f}")


def main() -> None:
    print("torch", torch.__version__, torch.cuda.get_device_name())
    attention_layouts()
    projections()
    top_candidates()


if __name__ == "__main__":
    main()
