"""Profile the compiled engine on CUDA: where a batch's and a decode step's time goes.

`python -m bench.profile_gpu CHECKPOINT [IMAGES] [STEP_ROWS]` prints the top kernels/ops by
device time for one warmed-up generate call (images x 6 captions x 16 tokens), then for 20
replays of the decode step (CUDA graph) of the STEP_ROWS-row bucket alone.
"""

from __future__ import annotations

import sys

import torch
from torch._dynamo.utils import counters
from torch.profiler import ProfilerActivity, profile

from model.engine import CaptionEngine
from model.styles import make_plan


def profiled(fn) -> str:
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70)


@torch.inference_mode()
def main() -> None:
    weights = sys.argv[1]
    images = int(sys.argv[2]) if len(sys.argv) > 2 else 64
    step_rows = int(sys.argv[3]) if len(sys.argv) > 3 else 64
    engine = CaptionEngine.from_files(weights, device="cuda", dtype=torch.bfloat16, compile_encoder=True,
                                      compile_decode=True)
    pixels = torch.randn(images, 3, 384, 384, device="cuda")
    plans = [make_plan({"seed": i, "max_new_tokens": 16}) for i in range(images)]
    for _ in range(2):
        engine.generate(pixels, plans)
    print(profiled(lambda: engine.generate(pixels, plans)))
    print(engine.last_stats)

    engine.run_static_steps(step_rows, 3)  # compile and record
    print(f"\n{step_rows}-row decode step, 20 replays:")
    print(profiled(lambda: engine.run_static_steps(step_rows, 20)))
    print("CUDA graph skips:", counters["inductor"]["cudagraph_skips"])


if __name__ == "__main__":
    main()
