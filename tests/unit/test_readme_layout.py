"""The README's repository layout lists every tracked file, once, and nothing that is gone."""

import subprocess

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.unit


def layout_entries() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = text.split("## Repository layout", 1)[1].split("```", 2)[1]
    return [line.split()[0] for line in block.splitlines() if line.strip()]


def test_layout_lists_every_tracked_file_once():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    listed = layout_entries()
    assert len(listed) == len(set(listed)), "a file is listed twice"
    assert sorted(set(tracked) - set(listed)) == [], "tracked but not in the README layout"
    assert sorted(set(listed) - set(tracked)) == [], "in the README layout but not tracked"
