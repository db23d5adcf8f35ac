"""The benchmark's target verdicts (met, missed, not judged for other configs) and the
positions its decode-step time is averaged over."""

import pytest

from bench.model_bench import check_targets, step_positions
from model.config import PRESETS

pytestmark = pytest.mark.unit


def test_target_verdicts():
    lines = check_targets({"cpu_one_image_s": 1.2, "gpu_images_per_s": 120.0, "cpu_decode_step_ms_64_rows": 3.0})
    assert lines == [
        "cpu_one_image_s: 1.200 s (target <= 1.5 s) -> MET",
        "gpu_images_per_s: 120.000 images/s (target >= 300.0 images/s) -> MISSED",
    ]
    # a figure exactly at its limit meets the target ("at most", "at least")
    assert [line.rsplit(" ", 1)[1] for line in check_targets({"cpu_one_image_s": 1.5, "gpu_images_per_s": 300.0})] \
        == ["MET", "MET"]
    assert check_targets({"cpu_one_image_s": None}) == []
    (line,) = check_targets({"cpu_one_image_s": 0.05}, full_size=False)
    assert line.endswith("-> not judged (not the full-size model)")


def test_step_positions_spread_over_the_caption():
    full, tiny = PRESETS["seed-full"], PRESETS["seed-tiny"]
    first = full.prefix_len + 2
    positions = step_positions(full, 64, 32)
    assert len(positions) == 32 and positions[0] == first and positions[-1] == first + 62
    assert positions == sorted(set(positions))
    assert step_positions(full, 8, 32) == list(range(first, first + 7))  # fewer steps than samples: each
    assert step_positions(tiny, 128, 32)[-1] == tiny.prefix_len + 2 + tiny.max_text_tokens - 2  # capped
