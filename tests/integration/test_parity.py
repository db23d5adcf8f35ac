"""Parity with the original implementation's golden outputs on the tiny seed checkpoint (float32)."""

import json
import subprocess
import sys

import pytest
import torch

from model.config import STYLE_TOKEN_IDS
from model.reference import sequence_logits
from model.styles import STYLES, make_plan
from tests.conftest import REPO, SEED_TINY

pytestmark = pytest.mark.integration
TOLERANCE = 1e-4


def teacher_forced(engine, image):
    forced = image["teacher_forced"]
    styles = torch.tensor([STYLE_TOKEN_IDS[s] for s in forced["styles"]])
    pixels = image["pixel_values"][None].expand(len(styles), -1, -1, -1)
    with torch.inference_mode():
        return forced, sequence_logits(engine.model, pixels, styles, forced["input_ids"])


def test_full_logits_of_the_first_image(tiny_engine, golden):
    first = next(iter(golden["images"].values()))
    forced, logits = teacher_forced(tiny_engine, first)
    assert logits.shape == forced["logits"].shape
    assert (logits - forced["logits"]).abs().max() <= TOLERANCE


@pytest.mark.parametrize("name", ["coffee.png", "chelsea.png", "rocket.jpg"])
def test_top20_and_logsumexp(tiny_engine, golden, name):
    forced, logits = teacher_forced(tiny_engine, golden["images"][name])
    top = logits.topk(20, dim=-1)
    assert torch.equal(top.indices, forced["top20_indices"])
    assert (top.values - forced["top20_values"]).abs().max() <= TOLERANCE
    assert (logits.logsumexp(-1) - forced["logsumexp"]).abs().max() <= TOLERANCE


@pytest.mark.parametrize(
    "kind, options",
    [("greedy", {"temperature": 0}), ("greedy_plain", {"temperature": 0, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0})],
)
def test_greedy_token_sequences_in_one_batch(tiny_engine, golden, golden_pixels, kind, options):
    names, pixels = golden_pixels
    plans = [make_plan(dict(options, num_captions=1))] * len(names)
    rows, ids = tiny_engine.generate(pixels, plans)
    assert len(rows) == len(names) * len(STYLES)
    for row, row_ids in zip(rows, ids):
        expected = golden["images"][names[row.image]][kind][row.style]["ids"]
        assert [101] + row_ids + [102] == expected, (names[row.image], row.style)


def test_greedy_captions_through_the_cli(expected_captions):
    images = sorted(str(p) for p in (SEED_TINY / "images").iterdir())
    command = [sys.executable, "-m", "model", *images, "--weights", str(SEED_TINY / "weights.pt"),
               "--config", str(SEED_TINY / "config.json"), "--temperature", "0", "--num-captions", "1",
               "--dtype", "float32"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, check=True)
    captions = json.loads(result.stdout)
    assert sorted(captions) == images  # every image, each once
    for path, by_style in captions.items():
        name = path.rsplit("/", 1)[-1]
        assert by_style == {s.capitalize(): [expected_captions[name]["greedy"][s]] for s in STYLES}


def test_cli_reports_bad_input(tmp_path):
    bad = tmp_path / "not-an-image.jpg"
    bad.write_text("hello")
    command = [sys.executable, "-m", "model", str(bad), "--weights", str(SEED_TINY / "weights.pt"),
               "--config", str(SEED_TINY / "config.json")]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "error:" in result.stderr
