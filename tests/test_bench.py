"""``crackscan bench``: the bare model and the whole pipeline measured in one run (numbers are
printed and recorded, never asserted against a speed: only their consistency is checked)."""

from __future__ import annotations

import json

import pytest
from support import crackscan

from crackscan.bench import median_repeat, vehicle_speed_kmh
from crackscan.config import PipelineConfig
from inference.backends import bundled_model_path

KEYS = {"model_fps", "pipeline_fps", "latency_ms_p50", "latency_ms_p99", "backend", "input",
        "pipeline_efficiency", "speed_kmh", "memory_mb_model", "memory_mb_stage_max"}


@pytest.mark.slow
def test_bench_json_measures_model_and_pipeline_on_the_same_frames(tmp_path):
    """With test-time augmentation in the pipeline config, the bare-model rate is measured with
    it too (the workers run it), so the efficiency still compares like with like."""
    config = tmp_path / "tta.yaml"
    config.write_text("inference:\n  tta: hflip\n")
    result = json.loads(crackscan("bench", "--source", "synthetic:1.2", "--frames", "4",
                                  "--config", config, "--live", "--format", "json").stdout)
    assert KEYS <= set(result)
    # 640x360 frames in the default fitted tiles (two of 360x352), mirrored as configured
    assert result["input"] == "640x360"
    assert result["backend"] == "onnxruntime+batch8+tiles512+hflip"
    assert result["model_frames"] == 4 and result["pipeline_frames"] == 30
    assert result["pipeline_status"] == "complete"
    assert result["model_fps"] > 0 and result["pipeline_fps"] > 0
    assert 0 < result["latency_ms_p50"] <= result["latency_ms_p99"]
    assert result["pipeline_efficiency"] == pytest.approx(result["pipeline_fps"]
                                                          / result["model_fps"])
    # 640 px along the tunnel at 0.5 mm/px, 10 % overlap, one camera
    assert result["speed_kmh"] == pytest.approx(result["pipeline_fps"] * 0.32 * 0.9 * 3.6)
    assert result["memory_mb_model"] > 50
    # live: the 30 frames at the drive's 25 frames/s, more than a CPU takes with TTA; reading
    # waits for the worker, so each frame is stored or counted dropped, none lost at start-up
    assert result["live_status"] == "complete" and result["live_frames_read"] == 30
    assert result["live_frames_stored"] + result["live_frames_dropped"] == 30
    assert result["live_frames_stored"] >= 1 and result["live_frames_dropped"] > 0
    assert 0 < result["live_latency_ms_p50"] <= result["live_latency_ms_p99"]
    assert result["live_latency_over_model"] == pytest.approx(result["live_latency_ms_p50"]
                                                              / result["latency_ms_p50"])
    assert result["live_inference_ms_p50"] > 0
    # a steady rate needs three stored frames (a slow host with TTA may store fewer in 1.2 s)
    assert result["live_fps"] > 0 or result["live_frames_stored"] < 3


def test_vehicle_speed_by_hand():
    # 10 frames/s, 1280 px along at 0.5 mm/px = 0.64 m per frame, no overlap: 6.4 m/s
    speed, along_mm, cameras = vehicle_speed_kmh(10.0, (720, 1280), PipelineConfig(), 0.0)
    assert (speed, along_mm, cameras) == (pytest.approx(23.04), 640.0, 1)
    # a rig of two cameras shares the rate; rows along the tunnel on the second camera
    rig = PipelineConfig(rig=[{"id": "a", "source": "camera:0"},
                              {"id": "b", "source": "camera:1", "along_axis": "y",
                               "mm_per_px_along": 1.0}])
    speed, along_mm, cameras = vehicle_speed_kmh(10.0, (720, 1280), rig, 0.25)
    assert cameras == 2 and along_mm == 640.0  # the shorter of 640 mm and 720 mm
    assert speed == pytest.approx(5 * 0.64 * 0.75 * 3.6)


def test_bench_refuses_a_bad_overlap():
    result = crackscan("bench", "--overlap", "1.5", check=False)
    assert result.returncode == 2 and "--overlap" in result.stderr


def test_build_engine_without_tensorrt_says_where_it_comes_from():
    result = crackscan("build-engine", "--out", "never.plan", check=False)
    assert result.returncode == 2 and "TensorRT is not installed" in result.stderr
    assert "pypi.nvidia.com" in result.stderr and "Traceback" not in result.stderr
    result = crackscan("build-engine", "--out", "never.plan", "--int8", check=False)
    assert result.returncode == 2 and "--calib" in result.stderr


@pytest.mark.slow
def test_bench_repeats_and_reports_one_repeat_with_the_spread():
    result = json.loads(crackscan("bench", "--source", "synthetic:0.6", "--frames", "2",
                                  "--repeat", "2", "--format", "json").stdout)
    repeats = result["repeats"]
    assert len(repeats) == 2
    efficiencies = sorted(r["pipeline_efficiency"] for r in repeats)
    # of two, the lower (the median of an even count rounds down); its numbers belong together
    assert result["pipeline_efficiency"] == efficiencies[0]
    chosen = next(r for r in repeats if r["pipeline_efficiency"] == efficiencies[0])
    assert (result["model_fps"], result["pipeline_fps"]) == (chosen["model_fps"],
                                                             chosen["pipeline_fps"])
    assert (result["pipeline_efficiency_min"], result["pipeline_efficiency_max"]) == (
        efficiencies[0], efficiencies[1])


def test_the_median_repeat_is_reported_whole():
    """Of three repeats, the one of median efficiency, every number from that repeat."""
    repeats = [{"model_fps": m, "pipeline_fps": p, "pipeline_efficiency": p / m, "extra": i}
               for i, (m, p) in enumerate([(10.0, 9.5), (12.0, 9.0), (8.0, 7.0)])]
    result = median_repeat(repeats)
    assert result["extra"] == 2 and result["pipeline_efficiency"] == 7.0 / 8.0
    assert (result["pipeline_efficiency_min"], result["pipeline_efficiency_max"]) == (
        9.0 / 12.0, 9.5 / 10.0)
    assert [r["model_fps"] for r in result["repeats"]] == [10.0, 12.0, 8.0]
    assert median_repeat(repeats[:1]) == repeats[0]


def test_bench_batches_sweeps_the_bare_backend_on_full_tiles():
    result = json.loads(crackscan("bench", "--source", "synthetic:0.2", "--batches", "1,3",
                                  "--tile", "64", "--threads", "1", "--format", "json").stdout)
    assert result["input"] == "64x64 tiles" and result["backend"] == "onnxruntime+batch3"
    assert result["model"].startswith("mobilenet_aspp@") and result["memory_mb_model"] > 0
    assert [row["batch"] for row in result["batches"]] == [1, 3]
    for row in result["batches"]:
        assert row["tiles_per_s"] > 0
        assert 0 < row["latency_ms_p50"] <= row["latency_ms_p99"]
    for bad in ("0,2", "a,b"):
        done = crackscan("bench", "--batches", bad, check=False)
        assert done.returncode != 0 and "--batches" in done.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_bench_measures_two_models_in_one_run_taking_turns(tiny_model):
    result = json.loads(crackscan("bench", "--source", "synthetic:0.6", "--frames", "2",
                                  "--model", tiny_model.model, "--model",
                                  bundled_model_path(), "--format", "json").stdout)
    first, second = result["models"]
    assert first["model"].startswith("mobilenet_aspp@") and first["model"] != second["model"]
    assert result["relative"][0] == {"model": first["model"], "model_fps": 1.0,
                                     "pipeline_fps": 1.0}
    assert result["relative"][1]["model_fps"] == pytest.approx(
        second["model_fps"] / first["model_fps"])
    refused = crackscan("bench", "--model", tiny_model.model, "--model", tiny_model.model,
                        "--batches", "1", check=False)
    assert refused.returncode == 2 and "--batches" in refused.stderr
