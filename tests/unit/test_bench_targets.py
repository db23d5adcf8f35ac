"""The benchmark's target verdicts: met, missed, and not judged for other configs."""

import pytest

from bench.model_bench import check_targets

pytestmark = pytest.mark.unit


def test_target_verdicts():
    lines = check_targets({"cpu_one_image_s": 1.2, "gpu_images_per_s": 120.0, "cpu_decode_step_ms_64_rows": 3.0})
    assert lines == [
        "cpu_one_image_s: 1.200 s (target <= 1.5 s) -> MET",
        "gpu_images_per_s: 120.000 images/s (target >= 300.0 images/s) -> MISSED",
    ]
    assert check_targets({"cpu_one_image_s": None}) == []
    (line,) = check_targets({"cpu_one_image_s": 0.05}, full_size=False)
    assert line.endswith("-> not judged (not the full-size model)")
