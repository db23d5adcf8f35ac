"""`python -m bench model` end to end on the tiny checkpoint: figures, baseline ratio, files."""

import json

import pytest
import torch

from bench.__main__ import main
from tests.conftest import SEED_TINY

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("prepack, stem", [(True, "model-cpu-float32"), (False, "model-cpu-float32-unpacked")])
def test_model_bench_writes_figures_and_the_baseline_ratio(tmp_path, capsys, prepack, stem):
    argv = ["model", "--weights", str(SEED_TINY / "weights.pt"), "--config", str(SEED_TINY / "config.json"),
            "--batch-sizes", "1,2", "--step-rows", "6", "--max-new-tokens", "6", "--out", str(tmp_path),
            "--dtype", "float32", "--prepack" if prepack else "--no-prepack"]  # auto is bfloat16 on AVX-512 BF16 hosts
    assert main(argv) == 0
    printed = capsys.readouterr().out
    results = json.loads((tmp_path / f"{stem}.json").read_text())
    assert (tmp_path / f"{stem}.png").stat().st_size > 10_000
    assert results["prepack"] is prepack and results["fused"] is True
    assert results["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and isinstance(results["cpu_native_bf16"], bool)
    assert [r["batch"] for r in results["engine"]] == [1, 2]
    assert all(r["new_tokens_per_s"] > 0 and r["decode_steps_ms"] > 0 for r in results["engine"])
    assert results["decode_step_ms"]["6"] > 0
    assert results["baseline"]["s_per_image"] > 0
    assert all(r["speedup_vs_baseline"] > 0 for r in results["engine"])
    assert "faster per image" in printed and results["targets"]
    assert all("not judged (not the full-size model)" in line for line in results["targets"])  # tiny config


def test_model_bench_times_the_compiled_cpu_step(tmp_path, capsys):
    argv = ["model", "--weights", str(SEED_TINY / "weights.pt"), "--config", str(SEED_TINY / "config.json"),
            "--batch-sizes", "1,2", "--step-rows", "6", "--max-new-tokens", "6", "--out", str(tmp_path),
            "--dtype", "float32", "--compile-step", "--no-baseline"]
    assert main(argv) == 0
    results = json.loads((tmp_path / "model-cpu-float32-compiled-step.json").read_text())
    assert results["compile_step"] is True and results["prepack"] is True
    assert set(results["warmup_s"]) == {"1", "2"} and results["decode_step_ms"]["6"] > 0
    assert "warm-up (compiles on first use)" in capsys.readouterr().out


def test_handler_bench_runs_the_real_handler_and_reports_refusals(tmp_path, capsys):
    tiny = ["--weights", str(SEED_TINY / "weights.pt"), "--config", str(SEED_TINY / "config.json"),
            "--batch-size", "2", "--batches", "1", "--out", str(tmp_path)]
    assert main(["handler", *tiny, "--max-new-tokens", "8", "--warmup"]) == 0
    result = json.loads((tmp_path / "handler-cpu.json").read_text())
    assert result["warmup"] is True and result["initialize_s"] > 0
    assert result["images_per_s"] > 0 and result["captions_per_image"] == 6
    assert set(result["stage_ms_per_image"]) == {"preprocess", "inference", "postprocess", "preprocess_worker_cpu"}
    assert all(ms > 0 for ms in result["stage_ms_per_image"].values())
    assert "images/s" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="must be between 1 and 40"):  # the tiny model's token limit
        main(["handler", *tiny, "--max-new-tokens", "64"])


def test_handler_bench_times_several_worker_processes_together(tmp_path, capsys):
    argv = ["handler", "--weights", str(SEED_TINY / "weights.pt"), "--config", str(SEED_TINY / "config.json"),
            "--batch-size", "2", "--batches", "2", "--max-new-tokens", "4", "--workers", "2", "--out", str(tmp_path)]
    assert main(argv) == 0
    result = json.loads((tmp_path / "handler-cpu-2workers.json").read_text())
    assert result["workers"] == 2 and len(result["initialize_s"]) == 2
    assert [len(seconds) for seconds in result["batch_seconds"]] == [2, 2]
    assert result["images_per_s"] == pytest.approx(8 / result["wall_seconds"])
    assert result["wall_seconds"] >= max(max(seconds) for seconds in result["batch_seconds"])
    assert "2 workers on one device" in capsys.readouterr().out


def test_handler_bench_sends_raw_bodies_with_query_options(tmp_path):
    argv = ["handler", "--weights", str(SEED_TINY / "weights.pt"), "--config", str(SEED_TINY / "config.json"),
            "--batch-size", "2", "--batches", "1", "--max-new-tokens", "4", "--request-form", "raw",
            "--out", str(tmp_path)]
    assert main(argv) == 0
    result = json.loads((tmp_path / "handler-cpu.json").read_text())
    assert result["request_form"] == "raw" and result["captions_per_image"] == 6


def test_handler_bench_sends_camera_sized_photos_with_the_jpeg_draft(tmp_path, capsys):
    argv = ["handler", "--weights", str(SEED_TINY / "weights.pt"), "--config", str(SEED_TINY / "config.json"),
            "--batch-size", "2", "--batches", "1", "--max-new-tokens", "4", "--photo-size", "1024x768",
            "--jpeg-draft", "--out", str(tmp_path)]
    assert main(argv) == 0
    result = json.loads((tmp_path / "handler-cpu.json").read_text())
    assert result["photo_size"] == [1024, 768] and result["jpeg_draft"] is True
    with pytest.raises(SystemExit):
        main([*argv[:-5], "--photo-size", "big"])
    assert "expected WxH" in capsys.readouterr().err


def test_handler_bench_reports_a_failed_worker(tmp_path):
    argv = ["handler", "--weights", str(tmp_path / "missing.pt"), "--config", str(SEED_TINY / "config.json"),
            "--batch-size", "2", "--batches", "1", "--workers", "2", "--out", str(tmp_path)]
    with pytest.raises(SystemExit, match="a worker failed"):
        main(argv)


def test_model_bench_compiled_image_major_reports_the_slots_it_stepped(tmp_path, capsys):
    """`--compile --dynamic-rows --static-layout images` on CPU: 6 rows of default requests are
    stepped as a whole image bucket (2 images x 6 slots), and the file says so."""
    argv = ["model", "--weights", str(SEED_TINY / "weights.pt"), "--config", str(SEED_TINY / "config.json"),
            "--compile", "--no-compile-prefill", "--dynamic-rows", "--static-layout", "images", "--batch-sizes", "2",
            "--step-rows", "6", "--max-new-tokens", "4", "--no-baseline", "--dtype", "float32", "--out", str(tmp_path)]
    assert main(argv) == 0
    results = json.loads((tmp_path / "model-cpu-float32-compiled-dynamic-images.json").read_text())
    assert results["static_layout"] == "images" and results["decode_step_slots"] == {"6": 12}
    assert results["decode_step_ms"]["6"] > 0 and results["engine"][0]["images_per_s"] > 0
    assert "decode step, 6 rows (12 slots)" in capsys.readouterr().out


def test_host_probe_prints_each_variant_next_to_its_baseline(capsys):
    """`python -m bench.host_probe` on the tiny checkpoint, small: caption text (the template-form
    tidy is checked to give the same captions) and the three decode pools, one round."""
    from bench import host_probe

    lines = host_probe.caption_text_lines()
    assert lines[0].startswith("decode 384 rows x 64 random ids: word by word ") and "lookup" in lines[0]
    assert lines[1].startswith("tidy 384 dataset captions: template rule ") and "lookahead" in lines[1]
    pools = host_probe.preprocess_lines(str(SEED_TINY / "weights.pt"), str(SEED_TINY / "config.json"), requests=4,
                                        processes=2, rounds=1)
    assert [line.split(": ")[1].split("  ")[0] for line in pools] == [
        "threads", "processes, pixels pickled", "processes, pixels in shared memory"]
    assert all("preprocess" in line and "worker CPU" in line for line in pools)
