"""The README's "Serving with TorchServe, step by step" commands, run as written with bash and
curl against the real TorchServe serving the tiny fixture archive (as `captioner.mar`).

Only what a test server must change is substituted: the ports of 127.0.0.1:8080/8081/8082,
and the fixture image folder (`IMAGES=`), since the README's `../shared` is relative to a
checkout. The commands run in a folder laid out like the repository root (`ui/`, and the
server's `key_file.json`). Each `curl`'s output is compared with the `# ...` lines under it:
exactly where they are complete JSON, by structure where they elide with `...`, by metric
name for Prometheus lines.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.seed import SEED
from tests.e2e.torchserve import REPO

pytestmark = pytest.mark.e2e

SECTION = re.compile(r"^## Serving with TorchServe, step by step\n(.*?)^## ", re.MULTILINE | re.DOTALL)
FENCE = re.compile(r"^\s*```bash\n(.*?)^\s*```", re.MULTILINE | re.DOTALL)
RUNNABLE = ("curl ", "printf ", "KEY=", "MKEY=", "IMAGES=")
README_PORTS = {"8080": "inference", "8081": "management", "8082": "metrics"}


def readme_steps() -> list[tuple[str, str]]:
    """(command, expected output) for every runnable line of the section's bash blocks, in order;
    continuation lines joined, the `# ` comment lines right under a command its expectation."""
    section = SECTION.search((REPO / "README.md").read_text(encoding="utf-8")).group(1)
    steps = []
    for block in FENCE.findall(section):
        lines = [line.strip() for line in block.replace("\\\n", " ").splitlines()]
        for line in lines:
            if line.startswith(RUNNABLE):
                steps.append([line, ""])
            elif line.startswith("#") and steps and steps[-1][0].startswith("curl "):
                steps[-1][1] += line.lstrip("#").strip() + "\n"
    return [(command, expected.strip()) for command, expected in steps]


def json_keys(value) -> set[str]:
    if isinstance(value, dict):
        return set(value) | {k for v in value.values() for k in json_keys(v)}
    if isinstance(value, list):
        return {k for v in value for k in json_keys(v)}
    return set()


def check(command: str, expected: str, output: str) -> None:
    if not expected:
        return
    if expected[0] in "[{":
        if "..." not in expected:
            assert json.loads(output) == json.loads(expected), (command, output)
        else:  # elided: the same kind of document with every key shown
            shown = set(re.findall(r'"(\w+)":', expected))
            assert shown <= json_keys(json.loads(output)), (command, shown - json_keys(json.loads(output)), output)
    else:  # Prometheus text
        for line in expected.splitlines():
            name = line.split("{", 1)[0]
            assert re.search(rf"^{name}{{.*ModelName=\"captioner\"", output, re.MULTILINE), (command, name, output)


@pytest.fixture
def repo_like_root(tmp_path, server) -> Path:
    (tmp_path / "ui").symlink_to(REPO / "ui")
    (tmp_path / "key_file.json").symlink_to(server.workdir / "key_file.json")
    return tmp_path


OPTIONS_BLOCK = re.compile(r"^Options go in a JSON body[^\n]*:\n```bash\n(.*?)^```", re.MULTILINE | re.DOTALL)


def test_readme_json_options_pipeline(server, repo_like_root):
    """"What `make serve` does": the python | curl pipeline that sends options in a JSON body,
    as written (only the port substituted; $KEY is the inference key, as the banner sets it)."""
    block = OPTIONS_BLOCK.search((REPO / "README.md").read_text(encoding="utf-8")).group(1)
    command = block.replace("http://127.0.0.1:8080", f"http://127.0.0.1:{server.ports['inference']}")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "KEY": server.keys["inference"]}
    result = subprocess.run(["bash", "-c", command], cwd=repo_like_root, env=env, text=True, capture_output=True,
                            timeout=300)
    assert result.returncode == 0, (command, result.stderr)
    answer = json.loads(result.stdout)
    assert list(answer) == ["Concise"] and len(answer["Concise"]) == 1 and answer["Concise"][0], answer


def test_readme_has_the_steps_this_test_runs():
    commands = [command for command, _ in readme_steps()]
    assert sum(c.startswith("curl ") for c in commands) >= 10, commands
    assert any("-X POST" in c and "/models?" in c for c in commands)
    assert any("-F data=@" in c for c in commands) and any("--data @req.json" in c for c in commands)


def test_readme_step_by_step_commands(server, repo_like_root):
    assert shutil.which("curl"), "the README's commands need curl"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for command, expected in readme_steps():
        for port, api in README_PORTS.items():
            command = command.replace(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{server.ports[api]}")
        if command.startswith("IMAGES="):
            command = f"IMAGES={SEED / 'images'}"
        if command.startswith(("KEY=", "MKEY=", "IMAGES=")):  # carried to the next commands
            name, value = command.split("=", 1)
            env[name] = subprocess.run(["bash", "-c", f"echo {value}"], cwd=repo_like_root, env=env, text=True,
                                       capture_output=True, check=True).stdout.strip()
            continue
        result = subprocess.run(["bash", "-c", command], cwd=repo_like_root, env=env, text=True,
                                capture_output=True, timeout=300)
        assert result.returncode == 0, (command, result.stderr)
        check(command, expected, result.stdout)
