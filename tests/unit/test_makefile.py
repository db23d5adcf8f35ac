"""The Makefile's environment rule, dry-run (`make -n`): where torch comes from."""

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
