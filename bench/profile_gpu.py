"""Profile a few decode steps of the compiled engine on CUDA: where each step's time goes.

`python -m bench.profile_gpu CHECKPOINT [IMAGES]` prints the top kernels/ops by device time for
one warmed-up generate call (images x 6 captions x 16 tokens) and how many CUDA graph replays it made.
"""

from __future__ import annotations

import sys

import torch
from torch._dynamo.utils import counters
from torch.profiler import ProfilerActivity, profile

from model.engine import CaptionEngine
from model.styles import make_plan


def main() -> None:
    weights, images = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 64
    engine = CaptionEngine.from_files(weights, device="cuda", dtype=torch.bfloat16, compile_encoder=True,
                                      compile_decode=True)
    pixels = torch.randn(images, 3, 384, 384, device="cuda")
    plans = [make_plan({"seed": i, "max_new_tokens": 16}) for i in range(images)]
    for _ in range(2):
        engine.generate(pixels, plans)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        engine.generate(pixels, plans)
        torch.cuda.synchronize()
    print(engine.last_stats)
    print("CUDA graph skips:", counters["inductor"]["cudagraph_skips"])
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70)
    print(table)
    replays = [e for e in prof.events() if "graph" in e.name.lower()]
    print("graph-related events:", len(replays), sorted({e.name for e in replays})[:10])


if __name__ == "__main__":
    main()
