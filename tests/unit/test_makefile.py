"""The Makefile: its environment rule, dry-run (`make -n`: where torch comes from), and the
random-weights target run again."""

import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]


def dry_run(tmp_path, *variables: str) -> list[str]:
    if shutil.which("make") is None:
        pytest.fail("make is needed (the README's two commands are make targets)")
    result = subprocess.run(["make", "-n", "venv", f"VENV={tmp_path / 'venv'}", *variables], cwd=REPO,
                            capture_output=True, text=True, check=True, timeout=60)
    return result.stdout.splitlines()


def test_torch_comes_from_the_given_index_before_the_project_is_installed(tmp_path):
    lines = dry_run(tmp_path, "TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126")
    pinned = next(line for line in (REPO / "pyproject.toml").read_text().splitlines() if '"torch==' in line)
    torch_pin = pinned.strip().strip('",')
    torch_line = next(i for i, line in enumerate(lines) if "--index-url" in line)
    assert f"install -q '{torch_pin}' --index-url https://download.pytorch.org/whl/cu126" in lines[torch_line]
    assert torch_line < next(i for i, line in enumerate(lines) if "install -q -e" in line)


def test_without_an_index_torch_comes_with_the_project(tmp_path):
    assert not any("--index-url" in line for line in dry_run(tmp_path))


def test_weights_random_keeps_an_existing_checkpoint(tmp_path):
    """`python -m weights random` refuses to replace a file; the make target, run again, keeps it."""
    existing = tmp_path / "random-init-weights.pt"
    existing.write_bytes(b"kept")
    result = subprocess.run(["make", "weights-random", "STAMP=", f"RANDOM_WEIGHTS={existing}"], cwd=REPO,
                            capture_output=True, text=True, check=True, timeout=60)
    assert f"{existing} exists; kept" in result.stdout and existing.read_bytes() == b"kept"
