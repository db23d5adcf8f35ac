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
ALL_STEPS = ["tests", "layout-ab", "handler", "handler-images", "processes", "raw", "compiled", "dynamic", "rows-ab",
             "warmup-dynamic", "handler-before", "workers", "handler-128", "profile", "profile-images", "warmup",
             "eager", "handler-tests"]


def run_gpu_check(tmp_path: Path, *steps: str) -> tuple[str, list[list[str]]]:
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    calls = tmp_path / "calls.txt"
    (stubs / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA Stand-in, 1 MiB, 0'\n")
    (stubs / "python").write_text(f'#!/bin/sh\nfor a in "$@"; do printf "%s\\0" "$a"; done >> {calls}\necho >> {calls}\n')
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    env = dict(os.environ, PATH=f"{stubs}:{os.environ['PATH']}", PYTHON=str(stubs / "python"),
               CKPT=str(tmp_path / "w.pt"))
    out = tmp_path / "out"
    subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), str(out), *steps], env=env, check=True,
                   capture_output=True, timeout=60)
    argvs = [line.strip("\0").split("\0") for line in calls.read_text().splitlines() if line.strip("\0")]
    return (out / "summary.txt").read_text(), argvs


def test_every_step_runs_in_order_with_valid_bench_flags(tmp_path):
    summary, argvs = run_gpu_check(tmp_path)
    headers = [line.split()[1] for line in summary.splitlines() if line.startswith("=== ")]
    assert headers == ["versions", *ALL_STEPS, "done"]
    bench_calls = [argv[2:] for argv in argvs if argv[:2] == ["-m", "bench"]]
    assert [call[0] for call in bench_calls] == [*["model"] * 2, *["handler"] * 4, *["model"] * 4, *["handler"] * 5,
                                                 "model"]
    parser = build_parser()
    for call in bench_calls:
        parser.parse_args(call)  # exits (SystemExit) on an unknown flag
    assert any("--dynamic-rows" in call and "--warmup" in call for call in bench_calls)
    assert any("--no-compile-prefill" in call and "--decode-intra-op-threads" in call for call in bench_calls)
    assert any(call[call.index("--workers") + 1] == "2" for call in bench_calls if "--workers" in call)
    assert any("--decode-processes" in call for call in bench_calls)
    layouts = [call[call.index("--static-layout") + 1] for call in bench_calls if "--static-layout" in call]
    assert layouts == ["rows", "images", "images"]  # layout-ab (model), handler-images
    assert any(call[call.index("--request-form") + 1] == "raw" for call in bench_calls if "--request-form" in call)
    assert ["-m", "bench.profile_gpu", str(tmp_path / "w.pt"), "64", "8,64,384"] in argvs
    assert ["-m", "bench.profile_gpu", str(tmp_path / "w.pt"), "64", "8,64,384", "images"] in argvs
    assert sum(argv[:2] == ["-m", "pytest"] for argv in argvs) == 2


def test_a_selection_runs_only_those_steps(tmp_path):
    summary, argvs = run_gpu_check(tmp_path, "dynamic", "bogus", "tests")
    headers = [line.split()[1] for line in summary.splitlines() if line.startswith("=== ")]
    assert headers == ["versions", "dynamic", "tests", "done"]
    assert "unknown step 'bogus'" in summary
    assert shlex.join(argvs[-1][:2]) == "-m pytest"  # tests ran last, as asked
