"""Model benchmark: the engine across batch sizes, per stage, against the seed's algorithm.

For each batch size it times decoding the JPEG bytes, preprocessing, and one engine call
(encode, prefill, decode steps), then reports images/s and new tokens/s. The baseline
(`bench/baseline.py`, what the original server did) runs on the same images, checkpoint and
device in the same process, one request at a time, and the ratio is printed. A decode-step
micro-benchmark times one step of the (compiled) decoder for several row counts.
Writes `<out>/model-<device>.json` and a PNG plot.
"""

from __future__ import annotations

import io
import json
import platform
import time
from pathlib import Path

import torch
from PIL import Image
from torch._dynamo.utils import counters

from model.config import PRESETS
from model.engine import CaptionEngine
from model.image import decode_image, to_pixel_values, to_uint8_pixels
from model.kv_cache import GroupKV, PrefixKV
from model.packing import is_packed
from model.precision import cpu_has_native_bfloat16, resolve_dtype
from model.styles import make_plan

from .baseline import baseline_caption_ids

TARGETS = {  # figure -> (limit, unit, comparison); from the speed issue
    "cpu_one_image_s": (1.5, "s", "<="),
    "cpu_batch8_s_per_image": (0.6, "s/image", "<="),
    "gpu_decode_step_ms_64_rows": (0.3, "ms", "<="),
    "gpu_images_per_s": (300.0, "images/s", ">="),
}


def synthetic_jpegs(count: int, size=(640, 480), seed: int = 0) -> list[bytes]:
    """Photo-sized JPEGs with smooth gradients and noise (decode cost like a real photo)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        w, h = size
        ramp = torch.linspace(0, 1, w)[None, :, None] * torch.linspace(0, 1, h)[:, None, None]
        pixels = (ramp * torch.rand(1, 1, 3, generator=generator) * 255 + torch.rand(h, w, 3, generator=generator) * 40)
        buffer = io.BytesIO()
        Image.fromarray(pixels.clamp(0, 255).to(torch.uint8).numpy()).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_batch(engine: CaptionEngine, jpegs: list[bytes], options: dict) -> dict:
    device = engine.device
    start = time.perf_counter()
    images = [decode_image(b) for b in jpegs]
    decoded = time.perf_counter()
    preprocess = to_uint8_pixels if device.type == "cuda" else to_pixel_values  # as the handler does
    pixels = torch.stack([preprocess(im, engine.config.image_size) for im in images])
    preprocessed = time.perf_counter()
    engine.caption(pixels, [make_plan(options)] * len(jpegs))
    sync(device)
    done = time.perf_counter()
    stats = engine.last_stats
    total = done - start
    return {
        "batch": len(jpegs), "rows": stats["rows"], "new_tokens": stats["new_tokens"],
        "decode_image_ms": (decoded - start) * 1e3, "preprocess_ms": (preprocessed - decoded) * 1e3,
        "encode_ms": stats["encode_ms"], "prefill_ms": stats["prefill_ms"], "decode_steps_ms": stats["generate_ms"],
        "total_s": total, "s_per_image": total / len(jpegs), "images_per_s": len(jpegs) / total,
        "new_tokens_per_s": stats["new_tokens"] / total,
        # without the (serial, CPU) JPEG decoding and preprocessing
        "engine_images_per_s": len(jpegs) / (done - preprocessed),
    }


def time_baseline(engine: CaptionEngine, jpegs: list[bytes], options: dict) -> dict:
    start = time.perf_counter()
    for data in jpegs:
        pixels = to_pixel_values(decode_image(data), engine.config.image_size).to(engine.device)
        baseline_caption_ids(engine.model, pixels, make_plan(options))
    sync(engine.device)
    total = time.perf_counter() - start
    return {"images": len(jpegs), "total_s": total, "s_per_image": total / len(jpegs)}


def eager_cache_maker(engine: CaptionEngine, rows: int, rows_per_image: int = 6):
    """A function making a new eager cache for `rows` caption rows, six per image (the default
    request), over one random prefix: each timing starts with empty own buffers, as a caption does."""
    cfg = engine.config
    images = -(-rows // rows_per_image)
    shape = (images, cfg.num_heads, cfg.prefix_len, cfg.head_dim)
    prefix = PrefixKV()
    prefix.keys = [torch.randn(shape, dtype=engine.dtype, device=engine.device) for _ in range(cfg.depth)]
    prefix.values = [torch.randn(shape, dtype=engine.dtype, device=engine.device) for _ in range(cfg.depth)]
    groups = GroupKV(prefix, torch.arange(rows, device=engine.device) // rows_per_image)
    groups.keys = [torch.randn(rows, cfg.num_heads, 2, cfg.head_dim, dtype=engine.dtype, device=engine.device)
                   for _ in range(cfg.depth)]
    groups.values = [torch.randn_like(k) for k in groups.keys]
    row_image = [row // rows_per_image for row in range(rows)]
    row_group = torch.arange(rows, device=engine.device)
    return lambda: engine.eager_cache(prefix, groups, row_image, row_group, 2 + cfg.max_text_tokens)


def step_positions(config, max_new_tokens: int, samples: int) -> list[int]:
    """Up to `samples` cache positions spread evenly over a `max_new_tokens` caption's decode steps."""
    first, steps = config.prefix_len + 2, min(max_new_tokens, config.max_text_tokens) - 1
    count = min(samples, steps)
    return [first + round(i * (steps - 1) / max(count - 1, 1)) for i in range(count)]


@torch.inference_mode()
def time_decode_step(engine: CaptionEngine, rows: int, max_new_tokens: int, samples: int = 32) -> float:
    """Milliseconds per decode step for `rows` rows: the mean over positions spread over a
    `max_new_tokens` caption (a step costs more the more positions it attends over). With
    static shapes the step includes token selection (both are one CUDA graph)."""
    positions = step_positions(engine.config, max_new_tokens, samples)
    if engine.static_shapes:
        def run_steps():
            engine.run_static_steps(rows, positions)
    else:
        new_cache = eager_cache_maker(engine, rows)
        tokens = torch.full((rows,), engine.vocab.ids["a"], device=engine.device)  # any word: same cost

        def run_steps():
            cache = new_cache()
            for position in positions:
                cache.advance(position)
                engine.step_logits(cache, tokens)
    run_steps()  # warm-up: every span's graph compiled and recorded
    sync(engine.device)
    start = time.perf_counter()
    run_steps()
    sync(engine.device)
    return (time.perf_counter() - start) / len(positions) * 1e3


def check_targets(figures: dict, full_size: bool = True) -> list[str]:
    """One line per figure with a target; the targets are for the full-size model only."""
    lines = []
    for name, value in figures.items():
        if name not in TARGETS or value is None:
            continue
        limit, unit, comparison = TARGETS[name]
        met = value <= limit if comparison == "<=" else value >= limit
        verdict = ("MET" if met else "MISSED") if full_size else "not judged (not the full-size model)"
        lines.append(f"{name}: {value:.3f} {unit} (target {comparison} {limit} {unit}) -> {verdict}")
    return lines


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["engine"]
    batches = [r["batch"] for r in runs]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(batches, [r["images_per_s"] for r in runs], marker="o", label="engine")
    if results.get("baseline"):
        left.axhline(1 / results["baseline"]["s_per_image"], color="grey", linestyle="--", label="seed algorithm")
    left.set_xlabel("images per batch")
    left.set_ylabel("images / s")
    left.set_xscale("log", base=2)
    left.legend()
    stages = ["decode_image_ms", "preprocess_ms", "encode_ms", "prefill_ms", "decode_steps_ms"]
    bottom = [0.0] * len(runs)
    for stage in stages:
        values = [r[stage] / r["batch"] for r in runs]
        right.bar([str(b) for b in batches], values, bottom=bottom, label=stage.replace("_ms", ""))
        bottom = [a + b for a, b in zip(bottom, values)]
    right.set_xlabel("images per batch")
    right.set_ylabel("ms per image")
    right.legend(fontsize=8)
    precision = results["dtype"] + (f" + {results['quantize']} decoder" if results.get("quantize") else "")
    precision += " + oneDNN-packed decoder" if results.get("prepack") else ""
    fig.suptitle(f"{results['device_name']} · {precision} · {results['max_new_tokens']} new tokens max")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run(args) -> dict:
    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    dtype_name = str(dtype).removeprefix("torch.")
    engine = CaptionEngine.from_files(args.weights, config=args.config, device=device, dtype=dtype,
                                      quantize=args.quantize, prepack=args.prepack, fuse=args.fuse,
                                      compile_encoder=args.compile, compile_decode=args.compile,
                                      compile_prefill=args.compile and args.compile_prefill,
                                      dynamic_rows=args.dynamic_rows, static_layout=args.static_layout,
                                      compile_step=args.compile_step)
    packed = is_packed(engine.model)
    options = {"seed": 0, "max_new_tokens": args.max_new_tokens}
    jpegs = synthetic_jpegs(max(args.batch_sizes))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    results = {"device": str(device), "device_name": name, "dtype": dtype_name, "quantize": args.quantize,
               "prepack": packed, "fused": args.fuse, "dynamic_rows": engine.dynamic_rows, "compile": args.compile,
               "compile_step": engine.compile_step, "compile_prefill": engine.compile_prefill,
               "static_layout": engine.static_layout,
               "threads": torch.get_num_threads(),
               "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_native_bf16": cpu_has_native_bfloat16(),
               "max_new_tokens": args.max_new_tokens, "torch": torch.__version__, "engine": [], "decode_step_ms": {}}
    for batch in args.batch_sizes:
        started = time.perf_counter()
        time_batch(engine, jpegs[:batch], dict(options, max_new_tokens=4))  # warm-up (and compile)
        results.setdefault("warmup_s", {})[batch] = time.perf_counter() - started
        if args.compile or args.compile_step:
            print(f"batch {batch:4d}: warm-up (compiles on first use) {results['warmup_s'][batch]:.1f} s", flush=True)
        runs = [time_batch(engine, jpegs[:batch], options) for _ in range(args.repeats)]
        best = min(runs, key=lambda r: r["total_s"])
        results["engine"].append(best)
        print(f"batch {batch:4d}: {best['images_per_s']:8.2f} images/s {best['new_tokens_per_s']:9.0f} tok/s  "
              f"{best['s_per_image']:.3f} s/image  (decode {best['decode_image_ms']:.0f} ms, preprocess "
              f"{best['preprocess_ms']:.0f} ms, encode {best['encode_ms']:.0f} ms, prefill {best['prefill_ms']:.0f} ms,"
              f" steps {best['decode_steps_ms']:.0f} ms; engine only {best['engine_images_per_s']:.1f} images/s)", flush=True)
    for rows in args.step_rows:
        results["decode_step_ms"][rows] = time_decode_step(engine, rows, args.max_new_tokens)
        slots = engine.static_placement(rows).rows if engine.static_shapes else rows
        results.setdefault("decode_step_slots", {})[rows] = slots  # image-major: whole image buckets
        print(f"decode step, {rows} rows{f' ({slots} slots)' if slots != rows else ''}: "
              f"{results['decode_step_ms'][rows]:.3f} ms (mean over a {args.max_new_tokens}-token caption's positions)",
              flush=True)
    if args.baseline:
        # The seed's algorithm on the seed's layers: plain nn.Linear, never fused, quantized or packed.
        plain = engine if not (packed or args.quantize or args.fuse) else CaptionEngine.from_files(
            args.weights, config=args.config, device=device, dtype=dtype, prepack=False, fuse=False)
        results["baseline"] = time_baseline(plain, jpegs[: args.baseline_images], options)
        base = results["baseline"]["s_per_image"]
        print(f"baseline (seed algorithm, one request at a time): {base:.3f} s/image", flush=True)
        for run_ in results["engine"]:
            run_["speedup_vs_baseline"] = base / run_["s_per_image"]
            print(f"  engine batch {run_['batch']}: {run_['speedup_vs_baseline']:.1f}x faster per image")
    by_batch = {r["batch"]: r for r in results["engine"]}
    kind = "gpu" if device.type == "cuda" else "cpu"
    figures = {
        f"{kind}_one_image_s": by_batch.get(1, {}).get("total_s"),
        f"{kind}_batch8_s_per_image": by_batch.get(8, {}).get("s_per_image"),
        f"{kind}_decode_step_ms_64_rows": results["decode_step_ms"].get(64),
        f"{kind}_images_per_s": max(r["images_per_s"] for r in results["engine"]),
    }
    if args.compile:  # graphs inductor could not capture (e.g. a CPU tensor or an unmarked mutated input)
        results["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"]
        print(f"CUDA graph skips: {results['cudagraph_skips']}")
    if device.type == "cuda":
        results["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        print(f"peak GPU memory: {results['peak_gpu_memory_gib']:.2f} GiB")
    results["targets"] = check_targets(figures, full_size=engine.config == PRESETS["seed-full"])
    print("\n".join(results["targets"]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = (f"model-{kind}-{dtype_name}{'-' + args.quantize if args.quantize else ''}"
            f"{'-unpacked' if args.prepack is False else ''}{'' if args.fuse else '-unfused'}"
            f"{'-compiled' if args.compile else ''}{'-compiled-step' if engine.compile_step else ''}"
            f"{'-dynamic' if engine.dynamic_rows else ''}"
            f"{'-images' if engine.static_layout == 'images' else ''}")
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out / f"{stem}.png")
    print(f"wrote {out / (stem + '.json')} and {out / (stem + '.png')}")
    return results
