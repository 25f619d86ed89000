"""The benchmarks' own arithmetic and plumbing (never their speed: no timed assertions here)."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import MODELS_DIR, REPO
from bench.bench_pipeline import OfflineFaces, first_event_delays, iou, paired_first_events
from bench.common import config_sections, ratio, summary


def test_summary_and_ratio():
    s = summary([10, 20, 30, None, float("nan")])
    assert s["n"] == 3 and s["p50"] == 20 and s["max"] == 30
    assert summary([]) == {"n": 0, "p50": None, "p90": None, "p99": None, "max": None}
    assert ratio(3, 2) == 1.5 and ratio(None, 2) is None and ratio(1, 0) is None


def test_config_overrides_apply_to_daemon_and_baseline_alike(tmp_path):
    args = argparse.Namespace(providers=["CPUExecutionProvider"], threads=1,
                              set=["models.detector_imgsz=640", "detect.min_blur=0",
                                   "embed.votes=2"])
    sections = config_sections(args, tmp_path / "d.onnx", tmp_path / "e.onnx")
    assert sections["models"]["detector_imgsz"] == 640 and sections["models"]["threads"] == 1
    assert sections["detect"] == {"min_blur": 0} and sections["embed"] == {"votes": 2}
    with pytest.raises(SystemExit, match="SECTION.KEY=VALUE"):
        config_sections(argparse.Namespace(providers=[], threads=0, set=["votes=2"]),
                        tmp_path, tmp_path)


def fake_offline() -> OfflineFaces:
    """A 10-frame clip at 10 fps: face 1 from frame 2 at the left, face 2 from frame 5."""
    off = OfflineFaces.__new__(OfflineFaces)
    off.fps, off.pts, off.period = 10.0, [i / 10 for i in range(10)], 1.0
    left, right = [0, 0, 10, 10], [50, 50, 60, 60]
    off.tracks = []
    for f in range(10):
        ids, boxes = ([1], [left]) if f >= 2 else ([], [])
        if f >= 5:
            ids, boxes = ids + [2], boxes + [right]
        off.tracks.append((np.array(ids, np.int64), np.array(boxes, np.float32).reshape(-1, 4)))
    off.first = {1: 2, 2: 5}
    return off


def test_first_event_delay_per_face_appearance():
    off = fake_offline()
    c = 1000.0                      # wall = pts + c: the file is played in real time

    def event(pts, box, after, type_="unknown"):
        return {"type": type_, "frame_pts": pts, "bbox": box, "capture_ts": c + pts,
                "ts": c + pts + after}
    events = [event(3.4, [0, 0, 10, 11], 0.1),             # loop 3, face 1 (appeared at 3.2)
              event(3.5, [0, 0, 10, 10], 0.1),             # a later event of the same face
              event(4.3, [1, 0, 10, 10], 0.05),            # loop 4, face 1 (appeared at 4.2)
              event(3.6, [200, 200, 210, 210], 0.1),       # nobody there: not attributed
              event(3.8, [0, 0, 10, 10], 0.1, "track_ended")]
    out, per_face = first_event_delays(off, events, (c + 3.0, c + 6.0), within=[0.2, 1.0])
    # appearances within [3.0, 6.0 - 1.0]: faces 1 and 2 of loops 3 and 4
    assert out["appearances"] == 4 and out["decided"] == 2
    assert out["first_event_delay_s"]["p50"] == pytest.approx(0.225, abs=1e-3)
    assert out["of_which_media_wait_s"]["max"] == pytest.approx(0.2, abs=1e-3)
    assert out["within_s"] == {"0.2": 0.25, "1": 0.5}
    assert out["events_not_attributed"] == 1 and out["pacing_spread_s"] == 0
    assert per_face == {1: pytest.approx(0.225, abs=1e-3)}   # loops 3 and 4 of face 1
    assert iou(np.array([0, 0, 10, 10.0]), np.array([[0, 0, 10, 10.0], [5, 0, 15, 10]])) \
        .tolist() == pytest.approx([1.0, 1 / 3])


def test_paired_first_events_compare_the_faces_both_decided():
    daemon = {1: 0.10, 2: 0.30, 3: 0.50, 4: 0.9}   # decided one more, a late one
    naive = {1: 0.12, 2: 0.25, 3: 0.60}
    paired = paired_first_events(daemon, naive)
    assert paired == {"faces": 3, "only_daemon": 1, "only_naive": 0, "daemon_p50_s": 0.30,
                      "naive_p50_s": 0.25, "daemon_minus_naive_p50_s": -0.02,
                      "daemon_no_later": pytest.approx(0.667, abs=1e-3)}
    assert paired_first_events({}, naive)["faces"] == 0   # one side decided nothing


def test_suite_summary_and_chart_from_results(tmp_path):
    from bench.run_all import chart, summarize

    results = {
        "pipeline": {"throughput": {"daemon_fps": 12.0, "naive_fps": 6.0,
                                    "ratio_daemon_over_naive": 2.0}},
        "stages": {"decode_fps": 150.0, "daemon_fps": 12.0, "pipelining_efficiency": 0.8,
                   "stage_fps_equivalent": {"decode": 150.0, "detect": 15.0, "embed": 400.0},
                   "transport": {"videoframe_1080p": {"ms_per_frame": 2.5, "mb_per_s": 2400}}},
        "cameras": {"naive_fps": 6.0, "by_cameras": [
            {"cameras": n, "fps_total": 12.0 + n, "fps_per_camera": (12.0 + n) / n,
             "decode_ceiling_fps": 150.0 * n} for n in (1, 2, 4)]},
        "detector": {"error": "exit status 1"},
    }
    s = summarize(results)
    assert s["pipeline"]["ratio_daemon_over_naive"] == 2.0
    assert s["stages"]["transport_ms_per_1080p_frame"] == 2.5
    assert [r["cameras"] for r in s["cameras"]["by_cameras"]] == [1, 2, 4]
    assert "detector" not in s
    png = tmp_path / "chart.png"
    assert chart(results, png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not chart({}, tmp_path / "none.png")


def soak_samples() -> list[dict]:
    """Eleven samples a minute apart, warm-up the first two minutes: `detect` grows by 1 MB a
    minute from 100 MB, `publish` stays at 50 MB, `embed` restarts (new pid) at minute 6."""
    out = []
    for m in range(11):
        procs = {"detect": {"pid": 10, "rss_mb": 100.0 + m, "uss_mb": 80.0 + m, "cpu_s": 30.0 * m},
                 "publish": {"pid": 11, "rss_mb": 50.0, "uss_mb": 30.0, "cpu_s": 1.0 * m},
                 "embed": {"pid": 12 if m < 6 else 13, "rss_mb": 60.0 if m < 6 else 45.0 + m / 10,
                           "uss_mb": 40.0, "cpu_s": 2.0 * m}}
        out.append({"t_s": 60.0 * m, "warmup": m < 2, "system_busy_s": 100.0 * m,
                    "processes": procs, "frames_captured": 100 * m, "frames_processed": 90 * m,
                    "frames_dropped": 10 * m, "faces_embedded": 5 * m,
                    "events_published": {"recognized": 2 * m}, "stage_restarts": {"embed": m >= 6}})
    return out


def test_soak_growth_slope_restarts_and_verdict(tmp_path):
    from bench.run_all import summarize
    from bench.soak import analyse, chart

    out = analyse(soak_samples(), max_growth_pct=5.0)
    detect = out["processes"]["detect"]["rss_mb"]
    assert (detect["warmup_end"], detect["end"], detect["max"]) == (102.0, 110.0, 110.0)
    assert detect["growth_pct"] == pytest.approx(100 * 8 / 102, abs=0.01)
    assert detect["slope_mb_per_min"] == pytest.approx(1.0)
    assert detect["post_warmup_samples"] == 9 and not detect["restarted_after_warmup"]
    assert out["processes"]["publish"]["rss_mb"]["growth_pct"] == 0
    embed = out["processes"]["embed"]["rss_mb"]   # measured on its last pid only
    assert embed["restarted_after_warmup"] and embed["pids"] == [12, 13]
    assert (embed["warmup_end"], embed["end"], embed["post_warmup_samples"]) == (45.6, 46.0, 5)
    assert not out["rss_growth_ok"] and out["rss_growth_pct_max"] == detect["growth_pct"]
    assert out["post_warmup"]["frames_processed"] == 720
    assert out["post_warmup"]["events_published_total"] == 16
    # 8 min: the machine busy 100 cpu-s a minute, the daemon 30 + 1 (embed's restart left out)
    assert out["cpu"]["daemon_cores"] == pytest.approx(31 / 60, abs=0.01)
    assert out["cpu"]["other_cores"] == pytest.approx(69 / 60, abs=0.01) and out["cpu"]["shared"]
    assert out["stage_restarts_total"] == 1
    assert analyse(soak_samples(), max_growth_pct=10.0)["rss_growth_ok"]
    doc = {**out, "samples": soak_samples(), "warmup_minutes": 2.0, "minutes": 10.0,
           "cameras": 4, "max_growth_pct": 5.0}
    png = tmp_path / "soak.png"
    assert chart(doc, png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    s = summarize({"soak": {**doc, "rss_growth_ok": True}})
    assert s["soak"]["rss_growth_ok"] and s["soak"]["frames_processed_after_warmup"] == 720


@pytest.mark.slow
def test_naive_loop_prints_its_json(models, data_dir):
    """The baseline runs on the real clip with the real models and prints one JSON object."""
    clip = data_dir / "videos" / "facenet_pytorch_video.mp4"
    if not clip.is_file():
        pytest.skip(f"clip not found: {clip}")
    proc = subprocess.run([sys.executable, "-m", "bench.naive_loop", "--quick", "--seconds",
                           "1", "--warmup", "0.5", "--models", str(MODELS_DIR)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["benchmark"] == "naive_loop" and out["runs"][0]["frames"] > 0
    assert out["fps"] > 0 and out["runs"][0]["latency_ms"]["n"] == out["runs"][0]["frames"]
