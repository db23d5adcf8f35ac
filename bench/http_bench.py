"""HTTP load benchmark of the caption service: ``python -m bench http``.

Drives a running TorchServe (``--url``/``--management-url`` with keys from ``--key-file`` or
``--key``/``--management-key``), or one it starts itself (``--start --weights W``: builds the
archive with ``export.build_archive`` and starts TorchServe through ``tests/e2e/torchserve.py``
in a private folder, with the handler's intra-op threads pinned by ``--threads``).

Batching on vs off: the same archive is registered under extra names through the management
API, once per ``--max-batch-delay`` value with ``batch_size=<--batch-size>`` and once with
``batch_size=1`` (one request at a time). ``describe`` confirms what TorchServe applied (the
API's batch_size / max_batch_delay override the archive's model-config.yaml; its
responseTimeout wins over the API's). The extra registrations are removed at the end.
``--no-register`` instead measures ``--model`` as it is registered.

Load: every request is the same JSON document (a small generated JPEG, base64, plus fixed
options), so every request is one image and costs the same. Closed loop (``--concurrency``):
N clients each send a request as soon as their previous one is answered; a level ends after a
fixed number of requests (``--requests``, or ``--rounds`` per client) or ``--max-seconds``.
Open loop (``--rate``): Poisson arrivals at a fixed rate, latency counted from the scheduled
arrival, so a server that falls behind shows it. Levels run interleaved across modes and
repeats (repeat, level, mode), so the noise of a shared host hits every mode alike.

Per level: images/s (successful requests / wall time from the first send to the last answer),
latency p50/p95/p99/max, errors by kind, the load average, and the mean batch size the server
formed (CaptionRequestsTotal / CaptionBatchesTotal deltas from the metrics endpoint, when
reachable). The ratio printed at the end: best images/s of each batched mode (over its
concurrency levels) / images/s of ``batch_size=1`` at concurrency 1 (one request at a time).
Writes ``<out>/<name>.json`` and ``<out>/<name>.png``.

This module runs the sweep and reports it; the clients and load levels are in
``bench/http_load.py``, the registrations, metrics and private server in ``bench/http_server.py``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import requests

from handler.cpu_cores import usable_cores

from .http_load import Client, closed_loop, open_loop, parse_option, request_body, request_options, synthetic_jpeg
from .http_server import (Management, Mode, applied_settings, check_applied, last_batch, mean_batch_size,
                          metric_totals, read_keys, start_server)


# ---------------------------------------------------------------------------- helpers
def load_average() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


# CPU features that decide the CPU path's dtype and kernels (model/precision.py, model/packing.py).
SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile")


def host_info() -> dict:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    flag_lists = [line.split(":", 1)[1].split() for line in lines if line.startswith("flags")]
    cpu = names[0] if names else platform.processor() or platform.machine()
    flags = set(flag_lists[0]) if flag_lists else set()
    info = {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable_cores(),
            "cpu_flags": [f for f in SPEED_FLAGS if f in flags],
            "python": platform.python_version(), "platform": platform.platform()}
    try:
        from importlib.metadata import version

        info.update(torch=version("torch"), torchserve=version("torchserve"))
    except Exception:  # noqa: BLE001 - informative only
        pass
    return info


def requests_for(concurrency: int, args) -> int:
    if args.requests:
        return args.requests
    return max(args.min_requests, args.rounds * concurrency)


def fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


# ---------------------------------------------------------------------------- report
def summarize_runs(runs: list[dict], modes: list[Mode]) -> list[dict]:
    """Per (mode, level): images/s of every repeat, their mean, best and spread; latency
    percentiles as the median over the repeats of each repeat's percentile."""
    rows = []
    levels = []
    for run in runs:
        level = (run["kind"], run.get("concurrency") or run.get("rate"))
        if level not in levels:
            levels.append(level)
    for mode in modes:
        for kind, value in levels:
            group = [r for r in runs if r["mode"] == mode.key and r["kind"] == kind
                     and (r.get("concurrency") or r.get("rate")) == value]
            if not group:
                continue
            ips = [r["images_per_s"] for r in group]
            mean = statistics.fmean(ips)

            def median_of(name: str):
                values = [r["latency_s"][name] for r in group if r["latency_s"][name] is not None]
                return statistics.median(values) if values else None

            batches = [r["mean_batch_size"] for r in group if r.get("mean_batch_size") is not None]
            rows.append({
                "mode": mode.key, "kind": kind, "concurrency" if kind == "closed" else "rate": value,
                "repeats": len(group), "images_per_s": mean, "images_per_s_best": max(ips), "images_per_s_runs": ips,
                "spread_pct": (max(ips) - min(ips)) / mean * 100 if mean else None,
                "p50_s": median_of("p50"), "p95_s": median_of("p95"), "p99_s": median_of("p99"),
                "errors": sum(r["errors"] for r in group), "requests": sum(r["requests"] for r in group),
                "mean_batch_size": statistics.fmean(batches) if batches else None,
            })
    return rows


def ratios(summary: list[dict], modes: list[Mode]) -> dict:
    """Best images/s of each batched mode (closed loop) over batch_size 1 at concurrency 1."""
    single = next((m for m in modes if m.batch_size == 1), None)
    base = next((r for r in summary if single and r["mode"] == single.key and r["kind"] == "closed"
                 and r["concurrency"] == 1), None)
    out = {}
    if base is None or not base["images_per_s"]:
        return out
    for mode in modes:
        if mode.batch_size in (None, 1):
            continue
        closed = [r for r in summary if r["mode"] == mode.key and r["kind"] == "closed"]
        if not closed:
            continue
        best = max(closed, key=lambda r: r["images_per_s"])
        runs, base_runs = best["images_per_s_runs"], base["images_per_s_runs"]
        out[mode.key] = {
            "best_concurrency": best["concurrency"], "images_per_s": best["images_per_s"],
            "baseline_images_per_s": base["images_per_s"], "ratio": best["images_per_s"] / base["images_per_s"],
            # the range the repeats allow: worst batched repeat / best baseline repeat, and vice versa
            # (None where a baseline repeat served nothing)
            "ratio_range": [min(runs) / max(base_runs), max(runs) / min(base_runs) if min(base_runs) else None],
            # least-disturbed repeats on a shared host: the best of each side
            "ratio_best_repeats": max(r["images_per_s_best"] for r in closed) / base["images_per_s_best"],
        }
    return out


def print_table(summary: list[dict], modes: list[Mode]) -> None:
    labels = {m.key: m.key for m in modes}
    print(f"\n{'mode':<14} {'level':>8} {'req':>5} {'err':>4} {'images/s':>9} {'runs':>17} {'spread':>7} "
          f"{'p50 s':>7} {'p95 s':>7} {'p99 s':>7} {'batch':>6}")
    for row in summary:
        level = f"c={row['concurrency']}" if row["kind"] == "closed" else f"{row['rate']:g}/s"
        runs = "/".join(f"{v:.2f}" for v in row["images_per_s_runs"])
        print(f"{labels[row['mode']]:<14} {level:>8} {row['requests']:>5} {row['errors']:>4} "
              f"{row['images_per_s']:>9.3f} {runs:>17} {fmt(row['spread_pct'], '.0f'):>6}% "
              f"{fmt(row['p50_s']):>7} {fmt(row['p95_s']):>7} {fmt(row['p99_s']):>7} "
              f"{fmt(row['mean_batch_size'], '.1f'):>6}")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = results["summary"]
    kinds = [k for k in ("closed", "open") if any(r["kind"] == k for r in summary)]
    fig, axes = plt.subplots(len(kinds), 2, figsize=(11, 4 * len(kinds)), squeeze=False)
    for row_axes, kind in zip(axes, kinds):
        x_name = "concurrency" if kind == "closed" else "rate"
        left, right = row_axes
        for mode in results["modes"]:
            rows = [r for r in summary if r["mode"] == mode["key"] and r["kind"] == kind]
            if not rows:
                continue
            xs = [r[x_name] for r in rows]
            line = left.plot(xs, [r["images_per_s"] for r in rows], marker="o", label=mode["label"])[0]
            for x, r in zip(xs, rows):
                left.scatter([x] * len(r["images_per_s_runs"]), r["images_per_s_runs"], s=10,
                             color=line.get_color(), alpha=0.5)
            right.plot(xs, [r["p95_s"] for r in rows], marker="o", label=mode["label"], color=line.get_color())
        if kind == "closed":
            base = next((r for r in summary if r["kind"] == "closed" and r["concurrency"] == 1 and
                         any(m["key"] == r["mode"] and m["batch_size"] == 1 for m in results["modes"])), None)
            if base:
                left.axhline(4 * base["images_per_s"], color="grey", linestyle="--", linewidth=1,
                             label="target: 4x one-at-a-time")
        xlabel = "concurrent clients (closed loop)" if kind == "closed" else "offered requests/s (Poisson)"
        xs = sorted({r[x_name] for r in summary if r["kind"] == kind})
        for ax in (left, right):
            ax.set_xlabel(xlabel)
            if kind == "closed":
                ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [f"{x:g}" for x in xs])
            ax.minorticks_off()
        left.set_ylabel("images / s (dots: repeats)")
        right.set_ylabel("p95 latency (s)")
        left.set_ylim(bottom=0)
        right.set_ylim(bottom=0)
        left.legend(fontsize=8)
        right.legend(fontsize=8)
    server = results["server"]
    model = Path(server["config"]).parent.name if server.get("config") else "full size"
    if server.get("cpu_quantize"):
        model += f" ({server['cpu_quantize']} decoder)"
    if server.get("cpu_compile_decode"):
        model += " (compiled step)"
    options = json.dumps(results["request"]["options"]) if results["request"]["options"] else "service defaults"
    fig.suptitle(f"{results['name']}: {model} model, {results['host']['cpu']} ({results['host']['cores']} cores), "
                 f"threads {server.get('threads', '?')}, options {options}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------- main
def build_modes(args) -> list[Mode]:
    if not args.register:
        return [Mode(key="as-registered", model=args.model, batch_size=None, max_batch_delay=None)]
    prefix = f"{args.model}-bench"
    modes = [Mode(key=f"b{args.batch_size}-d{delay}", model=f"{prefix}-b{args.batch_size}-d{delay}",
                  batch_size=args.batch_size, max_batch_delay=delay) for delay in args.max_batch_delay]
    if args.single:
        modes.append(Mode(key="b1", model=f"{prefix}-b1", batch_size=1, max_batch_delay=None))
    return modes


SECRET_OPTIONS = ("--key", "--management-key")


def recorded_command(argv: list[str]) -> str:
    """The command line for the results file, with the values of key options masked."""
    shown = []
    for arg in argv:
        if shown and shown[-1] in SECRET_OPTIONS:
            arg = "***"
        elif arg.startswith(tuple(f"{option}=" for option in SECRET_OPTIONS)):
            arg = arg.split("=", 1)[0] + "=***"
        shown.append(arg)
    return "python -m bench " + " ".join(shown)


def run(args, argv: list[str] | None = None) -> dict:
    command = recorded_command(argv if argv is not None else sys.argv[1:])
    options = request_options(args.max_new_tokens, args.num_captions, args.styles,
                              dict(parse_option(o) for o in args.option))
    image = synthetic_jpeg(*args.image_size)
    body = request_body(image, options)
    levels = [("closed", c) for c in args.concurrency] + [("open", r) for r in args.rate]
    if not levels:
        raise SystemExit("nothing to measure: give --concurrency and/or --rate")
    results: dict = {
        "name": args.name, "command": command, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": host_info(), "load_average": {"before": load_average()},
        "request": {"options": options, "image_size": list(args.image_size), "image_bytes": len(image),
                    "body_bytes": len(body)},
        "server": {}, "modes": [], "runs": [],
    }
    server = workdir = None
    modes = build_modes(args)
    management = None
    try:
        if args.start:
            server, workdir, archive = start_server(args, results)
            url, metrics_url = server.url("inference", ""), server.url("metrics", "")
            inference_key, management_key = server.keys.get("inference"), server.keys.get("management")
            management = Management(server.url("management", ""), management_key)
        else:
            keys = read_keys(args.key_file) if args.key_file else {}
            inference_key = args.key or keys.get("inference")
            management_key = args.management_key or keys.get("management")
            url, metrics_url = args.url, args.metrics_url
            management = Management(args.management_url, management_key)
            archive = args.archive
            if args.register and not archive:
                archive = management.describe(args.model)["modelUrl"]
            results["server"].update(url=url, archive=archive, threads=args.threads)

        for mode in modes:
            if mode.batch_size is None:
                try:
                    mode.applied = applied_settings(management.describe(mode.model))
                    mode.applied["worker"] = management.worker_facts(mode.model)
                except (RuntimeError, requests.RequestException) as exc:
                    mode.applied = {"describe": f"unavailable: {exc}"}
                continue
            print(f"registering {mode.model} ({mode.label}) from {archive} ...", flush=True)
            started = time.perf_counter()
            mode.applied = applied_settings(management.register(mode, archive))
            check_applied(mode, mode.applied)
            mode.applied["register_s"] = round(time.perf_counter() - started, 1)
            mode.applied["worker"] = management.worker_facts(mode.model)
            print(f"  describe: {mode.applied}", flush=True)
        results["modes"] = [{**asdict(mode), "label": mode.label} for mode in modes]

        clients = {mode.key: Client(url, mode.model, body, inference_key, args.timeout) for mode in modes}
        for mode in modes:  # first requests (the largest batch) pay for lazy allocation; not measured
            batch = mode.batch_size or mode.applied.get("batchSize") or 1
            warm = min(max(args.concurrency or [1]), batch)
            print(f"warm-up {mode.key}: {warm} concurrent request(s) ...", flush=True)
            level = closed_loop(clients[mode.key].send, warm, warm, args.max_seconds)
            if level["errors"]:
                raise RuntimeError(f"warm-up of {mode.model} failed: {level['error_kinds']}")

        print(f"\n{'repeat':>6} {'mode':<14} {'level':>8} {'req':>5} {'err':>4} {'images/s':>9} {'p50 s':>7} "
              f"{'p95 s':>7} {'p99 s':>7} {'batch':>6} {'load1':>6}", flush=True)
        for repeat in range(args.repeats):
            for kind, value in levels:
                for mode in modes:
                    before = metric_totals(metrics_url, mode.model)
                    send = clients[mode.key].send
                    if kind == "closed":
                        level = closed_loop(send, value, requests_for(value, args), args.max_seconds)
                    else:
                        count = args.requests or max(args.min_requests, math.ceil(value * args.open_seconds))
                        level = open_loop(send, value, count, args.max_seconds, seed=repeat)
                    level.update(mode=mode.key, repeat=repeat, load_average=load_average(),
                                 mean_batch_size=mean_batch_size(metrics_url, mode.model, before, level["requests"]),
                                 last_batch=last_batch(metrics_url, mode.model))
                    results["runs"].append(level)
                    lat = level["latency_s"]
                    label = f"c={value}" if kind == "closed" else f"{value:g}/s"
                    print(f"{repeat:>6} {mode.key:<14} {label:>8} {level['requests']:>5} {level['errors']:>4} "
                          f"{level['images_per_s']:>9.3f} {fmt(lat['p50']):>7} {fmt(lat['p95']):>7} "
                          f"{fmt(lat['p99']):>7} {fmt(level['mean_batch_size'], '.1f'):>6} "
                          f"{level['load_average'][0] if level['load_average'] else '-':>6}", flush=True)
                    if level["last_batch"]:
                        print("       last batch: " + ", ".join(f"{k} {v:g}" for k, v in level["last_batch"].items()),
                              flush=True)
                    if level["errors"]:
                        print(f"       errors: {level['error_kinds']}", flush=True)
    finally:
        if management is not None:
            for mode in modes:
                if mode.registered_here:
                    try:
                        management.unregister(mode.model)
                    except requests.RequestException:
                        pass
        if server is not None:
            server.stop()
        if workdir is not None and not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    results["load_average"]["after"] = load_average()
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    results["summary"] = summarize_runs(results["runs"], modes)
    results["ratio"] = ratios(results["summary"], modes)
    print_table(results["summary"], modes)
    for key, ratio in results["ratio"].items():
        low, high = ratio["ratio_range"]
        print(f"\n{key}: {ratio['images_per_s']:.3f} images/s at concurrency {ratio['best_concurrency']} vs "
              f"{ratio['baseline_images_per_s']:.3f} images/s one request at a time (b1, c=1): "
              f"{ratio['ratio']:.2f}x (repeats allow {low:.2f}x-{fmt(high)}x, best repeats "
              f"{ratio['ratio_best_repeats']:.2f}x; target >= 4x: "
              f"{'MET' if ratio['ratio'] >= 4 else 'MISSED'})")
    print(f"load average before {results['load_average']['before']}, after {results['load_average']['after']}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out / f"{args.name}.png")
    print(f"wrote {out / (args.name + '.json')} and {out / (args.name + '.png')}")
    return results
