"""bench/gpu_check.sh runs the steps asked for, in order, with flags the benchmarks accept.

The script runs here with stand-ins for python3 and nvidia-smi that record their arguments;
every `python -m bench ...` call it makes is then parsed by the real `python -m bench` parser.
"""

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from bench.__main__ import build_parser

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
ALL_STEPS = ["tests", "layout-ab", "handler", "threads", "photos", "handler-images", "images-processes", "processes", "raw", "compiled", "dynamic", "rows-ab",
             "warmup-dynamic", "handler-before", "workers", "handler-128", "profile", "profile-images", "warmup",
             "eager", "handler-tests"]


def run_gpu_check(tmp_path: Path, *steps: str, budget_s: int | None = None, seconds_per_call: int = 0):
    """-> (summary.txt, each python call's argv, each `timeout`'s limit in seconds)."""
    stubs = tmp_path / "stubs"
    stubs.mkdir(parents=True)
    calls, limits = tmp_path / "calls.txt", tmp_path / "limits.txt"
    (stubs / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA Stand-in, 1 MiB, 0'\n")
    (stubs / "python").write_text(f'#!/bin/sh\nfor a in "$@"; do printf "%s\\0" "$a"; done >> {calls}\necho >> {calls}\n'
                                  f'sleep ${{STUB_SECONDS:-0}}\n')
    (stubs / "timeout").write_text(f'#!/bin/sh\necho "$1" >> {limits}\nshift\nexec "$@"\n')
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    env = dict(os.environ, PATH=f"{stubs}:{os.environ['PATH']}", PYTHON=str(stubs / "python"),
               CKPT=str(tmp_path / "w.pt"))
    if budget_s is not None:
        env["BUDGET_S"] = str(budget_s)
    env["STUB_SECONDS"] = str(seconds_per_call)  # how long each stand-in python call takes
    out = tmp_path / "out"
    subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), str(out), *steps], env=env, check=True,
                   capture_output=True, timeout=60)
    argvs = [line.strip("\0").split("\0") for line in calls.read_text().splitlines() if line.strip("\0")]
    limit_values = [int(v) for v in limits.read_text().split()] if limits.exists() else []
    return (out / "summary.txt").read_text(), argvs, limit_values


def test_default_is_the_issues_check_parity_tests_then_compiled_and_eager_benchmarks(tmp_path):
    summary, argvs, limits = run_gpu_check(tmp_path)
    headers = [line.split()[1] for line in summary.splitlines() if line.startswith("=== ")]
    assert headers == ["versions", "tests", "compiled", "eager", "done"]
    assert [argv[:3] for argv in argvs if argv[0] == "-m" and argv[1] != "weights"] == [
        ["-m", "pytest", "-q"], ["-m", "bench", "model"], ["-m", "bench", "model"]]
    compiled, eager = (argv for argv in argvs if argv[:3] == ["-m", "bench", "model"])
    assert "--compile" in compiled and "--compile" not in eager and "--no-baseline" not in eager
    assert limits == [240, 200, 80]  # the steps' own limits: 520 s, more than the default budget of 470


def test_the_budget_cuts_limits_and_skips_what_it_cannot_fit(tmp_path):
    _, _, limits = run_gpu_check(tmp_path / "a", "tests", "compiled", budget_s=100)
    assert len(limits) == 2 and all(90 <= limit <= 100 for limit in limits)
    # Calls that take 3 s each (the versions line and the weights included: 6 s): the second step gets
    # what is left, and the third no longer fits.
    summary, argvs, limits = run_gpu_check(tmp_path / "c", budget_s=31, seconds_per_call=3)
    assert [line.split()[1] for line in summary.splitlines() if line.startswith("=== ")] == [
        "versions", "tests", "compiled", "eager", "done"]
    assert "=== eager skipped" in summary and len(limits) == 2 and limits[0] > limits[1] >= 20
    summary, argvs, _ = run_gpu_check(tmp_path / "b", "tests", "compiled", budget_s=10)
    assert "=== tests skipped" in summary and "=== compiled skipped" in summary
    assert not [argv for argv in argvs if argv[0] == "-m" and argv[1] != "weights"]


def test_every_step_runs_in_order_with_valid_bench_flags(tmp_path):
    summary, argvs, _ = run_gpu_check(tmp_path, "all", budget_s=10**6)
    headers = [line.split()[1] for line in summary.splitlines() if line.startswith("=== ")]
    assert headers == ["versions", *ALL_STEPS, "done"]
    bench_calls = [argv[2:] for argv in argvs if argv[:2] == ["-m", "bench"]]
    assert [call[0] for call in bench_calls] == [*["model"] * 2, *["handler"] * 8, *["model"] * 4, *["handler"] * 5,
                                                 "model"]
    drafts = [(call[call.index("--photo-size") + 1], call[-3]) for call in bench_calls if "--photo-size" in call]
    assert drafts == [("4032x3024", "--no-jpeg-draft"), ("4032x3024", "--jpeg-draft")]  # photos: the A/B
    parser = build_parser()
    for call in bench_calls:
        parser.parse_args(call)  # exits (SystemExit) on an unknown flag
    assert any("--dynamic-rows" in call and "--warmup" in call for call in bench_calls)
    assert any("--no-compile-prefill" in call and "--decode-intra-op-threads" in call for call in bench_calls)
    assert any(call[call.index("--workers") + 1] == "2" for call in bench_calls if "--workers" in call)
    pools = [call[call.index("--decode-processes") + 1] for call in bench_calls if "--decode-processes" in call]
    # threads (the default's A/B), images-processes, processes, handler-before, workers (two per GPU)
    assert pools == ["0", "15", "15", "0", "7"]
    layouts = [call[call.index("--static-layout") + 1] for call in bench_calls if "--static-layout" in call]
    assert layouts == ["rows", "images", "images", "images"]  # layout-ab (model), handler-images, images-processes
    both = [call for call in bench_calls if "--static-layout" in call and "--decode-processes" in call]
    assert len(both) == 1 and both[0][0] == "handler" and both[0][both[0].index("--decode-processes") + 1] == "15"
    assert any(call[call.index("--request-form") + 1] == "raw" for call in bench_calls if "--request-form" in call)
    assert ["-m", "bench.profile_gpu", str(tmp_path / "w.pt"), "64", "8,64,384"] in argvs
    assert ["-m", "bench.profile_gpu", str(tmp_path / "w.pt"), "64", "8,64,384", "images"] in argvs
    assert sum(argv[:2] == ["-m", "pytest"] for argv in argvs) == 2


def test_a_selection_runs_only_those_steps(tmp_path):
    summary, argvs, _ = run_gpu_check(tmp_path, "dynamic", "bogus", "tests")
    headers = [line.split()[1] for line in summary.splitlines() if line.startswith("=== ")]
    assert headers == ["versions", "dynamic", "tests", "done"]
    assert "unknown step 'bogus'" in summary
    assert shlex.join(argvs[-1][:2]) == "-m pytest"  # tests ran last, as asked
