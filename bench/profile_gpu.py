"""Profile the compiled engine on CUDA: where a batch's and a decode step's time goes.

`python -m bench.profile_gpu CHECKPOINT [IMAGES] [STEP_ROWS,...] [LAYOUT]` prints the top
kernels/ops by device time for one warmed-up generate call (images x 6 captions x 16 tokens),
then for each STEP_ROWS bucket the decode step (one CUDA graph) at a mid-sequence position:
wall time per step, kernels launched per step, their summed device time, and the costliest
kernels. LAYOUT: the static cache's, `rows` (default; static row count) or `images` (dynamic
sizes, as the engine requires for it).
"""

from __future__ import annotations

import sys
import time

import torch
from torch._dynamo.utils import counters
from torch.profiler import ProfilerActivity, profile

from model.engine import CaptionEngine
from model.styles import make_plan

PROFILED_STEPS = 20
TIMED_STEPS = 50


def profiled(fn) -> profile:
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return prof


def kernel_summary(prof: profile, steps: int, top: int = 20) -> list[str]:
    """Kernels per step and device time per step, overall and for the costliest kernel names."""
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name: dict[str, list[float]] = {}
    for event in kernels:
        by_name.setdefault(event.name, []).append(event.device_time)
    total_us = sum(event.device_time for event in kernels) / steps
    lines = [f"{len(kernels) / steps:.0f} kernels per step, {total_us / 1e3:.3f} ms of kernel time per step"]
    ranked = sorted(by_name.items(), key=lambda item: -sum(item[1]))[:top]
    lines += [f"{sum(times) / steps:9.1f} us {len(times) / steps:5.1f}x  {name[:110]}" for name, times in ranked]
    return lines


@torch.inference_mode()
def main() -> None:
    weights = sys.argv[1]
    images = int(sys.argv[2]) if len(sys.argv) > 2 else 64
    step_rows = [int(r) for r in sys.argv[3].split(",")] if len(sys.argv) > 3 else [64]
    layout = sys.argv[4] if len(sys.argv) > 4 else "rows"
    engine = CaptionEngine.from_files(weights, device="cuda", dtype=torch.bfloat16, compile_encoder=True,
                                      compile_decode=True, compile_prefill=True, static_layout=layout,
                                      dynamic_rows=layout == "images")
    size = engine.config.image_size
    pixels = torch.randn(images, 3, size, size, device="cuda")
    plans = [make_plan({"seed": i, "max_new_tokens": 16}) for i in range(images)]
    for _ in range(2):
        engine.generate(pixels, plans)
    prof = profiled(lambda: engine.generate(pixels, plans))
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))
    print(engine.last_stats)

    middle = engine.config.prefix_len + 2 + engine.config.max_text_tokens // 2
    for rows in step_rows:
        engine.run_static_steps(rows, [middle] * 3)  # compile and record
        torch.cuda.synchronize()
        started = time.perf_counter()
        engine.run_static_steps(rows, [middle] * TIMED_STEPS)
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - started) / TIMED_STEPS * 1e3
        print(f"\n{rows}-row decode step ({engine.static_placement(rows).rows} slots, {layout}), mid-sequence: "
              f"{wall_ms:.3f} ms per step (wall)")
        profile_steps = profiled(lambda: engine.run_static_steps(rows, [middle] * PROFILED_STEPS))
        print("\n".join(kernel_summary(profile_steps, PROFILED_STEPS)))
    print("CUDA graph skips:", counters["inductor"]["cudagraph_skips"])


if __name__ == "__main__":
    main()
