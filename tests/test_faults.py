"""Faults, each against the real daemon and bounded in time: damaged video files, bad model files,
a subscriber that never reads, SIGTERM under load.

Covered elsewhere (not repeated here): a camera that fails or disappears (test_pipeline,
test_capture), a stage SIGKILLed and restarted and SIGTERM with the full pipeline
(test_pipeline), bad config values and `validate-config` (test_config), bad enrollment photos
(test_enroll: not an image, no face, two faces, 1x1, a 20000x20000 header).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import psutil
import pytest
import yaml
import zmq
from zmq.utils.monitor import recv_monitor_message

from conftest import REPO, make_face_video, wait_for
from decision_feed import DecisionFeed, decision, publish_only_config
from facewatch.stages.errors import EXIT_CAMERAS_FAILED, EXIT_SETUP
from facewatch.stages.messages import parse_event
from test_pipeline import (capture_only_config, metric, pipeline_config, scrape,  # noqa: F401
                           sink)   # sink: a fixture


# --- damaged video files ---------------------------------------------------------------------

FRAMES = 50


def write_video(path: Path, fourcc: str, frames: int = FRAMES, size=(320, 240)) -> Path:
    """Numbered frames with some texture, so every frame is a real, distinct picture."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 25.0, size)
    assert writer.isOpened(), f"cv2.VideoWriter cannot write {path} with {fourcc}"
    rng = np.random.default_rng(0)
    for i in range(frames):
        frame = np.full((size[1], size[0], 3), 96, np.uint8)
        frame[:40] = rng.integers(0, 255, (40, size[0], 3), np.uint8)
        cv2.putText(frame, str(i), (60, 170), cv2.FONT_HERSHEY_SIMPLEX, 3, (255, 255, 255), 6)
        writer.write(frame)
    writer.release()
    return path


def damage(src: Path, dst: Path, how: str) -> Path:
    data = src.read_bytes()
    mid = len(data) // 2
    rng = np.random.default_rng(1)
    if how == "splice":                     # garbage inserted in the middle
        data = data[:mid] + rng.integers(0, 256, 20000, np.uint8).tobytes() + data[mid:]
    elif how == "truncate":                 # cut at half its bytes
        data = data[:mid]
    elif how == "corrupt_frames":           # garbage over the JPEG headers of 3 middle frames
        chunks = [i for i in range(len(data) - 4) if data[i:i + 4] == b"00dc"][:FRAMES]
        assert len(chunks) == FRAMES, "not an AVI of MJPEG frames"
        data = bytearray(data)
        for k in (24, 25, 26):
            start = chunks[k] + 8            # after the chunk id and its length
            data[start:start + 600] = rng.integers(0, 256, 600, np.uint8).tobytes()
        data = bytes(data)
    dst.write_bytes(data)
    return dst


@pytest.fixture(scope="module")
def damaged_videos(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("damaged")
    avi = write_video(d / "clean.avi", "MJPG")   # OpenCV's own AVI/MJPEG writer: always there
    mp4 = write_video(d / "clean.mp4", "mp4v")   # index (moov) at the end, as cv2 writes it
    return {"spliced": damage(avi, d / "spliced.avi", "splice"),
            "corrupt_frames": damage(avi, d / "corrupt_frames.avi", "corrupt_frames"),
            "truncated": damage(avi, d / "truncated.avi", "truncate"),
            "cut_mp4": damage(mp4, d / "cut.mp4", "truncate")}


@pytest.mark.timeout(180)
def test_damaged_files_are_read_as_far_as_they_go(damaged_videos, short_dir, sink, daemons):
    """One daemon, one camera per damaged file: every camera delivers the frames that decode,
    in order, and ends; nothing crashes or restarts; the daemon exits 0 by itself."""
    config = capture_only_config(short_dir, [
        {"name": name, "uri": str(path), "realtime": False}
        for name, path in damaged_videos.items()],
        capture={"reconnect_initial_s": 0.2, "reconnect_max_s": 1.0})
    daemon = daemons(config, short_dir / "run")
    sink.until(lambda: len(sink.eos) == len(damaged_videos), 120,
               "EndOfStream from every damaged file")
    assert daemon.wait_exit(30) == 0, daemon.log_text()[-3000:]
    got = {name: [f.frame_index for f in sink.frames if f.camera == name]
           for name in damaged_videos}
    for name, indices in got.items():
        assert indices == list(range(len(indices))), f"{name}: frames lost or out of order"
    assert len(got["spliced"]) >= FRAMES // 2, got["spliced"]            # at least up to the damage
    assert FRAMES - 5 <= len(got["corrupt_frames"]) < FRAMES, \
        "reading must go on past the undecodable frames"
    assert FRAMES // 4 <= len(got["truncated"]) < FRAMES
    assert got["cut_mp4"] == []                  # no index: nothing decodes, the camera ends
    reasons = {e.camera: e.reason for e in sink.eos}
    assert reasons == {"spliced": "eof", "corrupt_frames": "eof", "truncated": "eof",
                       "cut_mp4": "error"}
    stages = daemon.status()["stages"]
    assert {s["state"] for s in stages.values()} == {"finished"}
    assert all(s["restarts"] == 0 for s in stages.values())
    log = daemon.log_text()
    assert f"cannot read video file {damaged_videos['cut_mp4']}" in log
    assert f"undecodable frame(s) of {damaged_videos['corrupt_frames']}" in log
    assert "Traceback" not in log


@pytest.mark.timeout(120)
def test_every_camera_ended_with_an_error_is_a_failure(damaged_videos, short_dir, sink, daemons):
    """Issue 13, item 4: the only camera is a file that cannot be read at all; the daemon used
    to exit 0 as if it had done its job. It exits 69 (EX_UNAVAILABLE) naming the camera."""
    config = capture_only_config(short_dir, [
        {"name": "cut", "uri": str(damaged_videos["cut_mp4"]), "realtime": False}],
        capture={"reconnect_initial_s": 0.2, "reconnect_max_s": 1.0})
    daemon = daemons(config, short_dir / "run")
    sink.until(lambda: len(sink.eos) == 1, 60, "EndOfStream from the unreadable file")
    assert daemon.wait_exit(30) == EXIT_CAMERAS_FAILED == 69, daemon.log_text()[-3000:]
    assert "every camera ended with an error (cut): exit status 69" in daemon.log_text()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_damaged_face_video_through_the_pipeline(models, knn_dir, short_dir, gallery_module,
                                                 daemons, tmp_path):
    """A face video with garbage in the middle and its end cut off, through detect, embed,
    match and publish: events for what decodes, whole log lines, exit 0."""
    clean = make_face_video(tmp_path / "faces.mp4", [knn_dir / "test" / "obama1.jpg",
                                                     knn_dir / "test" / "alex_lacamoire1.jpg"],
                            size=(320, 240), seconds_each=1.2)
    cap = cv2.VideoCapture(str(clean.path))
    avi = cv2.VideoWriter(str(tmp_path / "faces.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 25.0,
                          (320, 240))
    while (frame := cap.read()[1]) is not None:
        avi.write(frame)
    avi.release()
    data = (tmp_path / "faces.avi").read_bytes()
    third = len(data) // 3
    damaged = tmp_path / "damaged.avi"
    damaged.write_bytes(data[:third] + os.urandom(20000) + data[third + 20000:int(len(data) * .8)])
    config = pipeline_config(short_dir, [{"name": "cam", "uri": str(damaged), "realtime": False}])
    cfg = yaml.safe_load(config.read_text())
    daemon = daemons(config, short_dir / "run")
    assert daemon.wait_exit(240) == 0, daemon.log_text()[-3000:]
    raw = Path(cfg["publish"]["event_log"]).read_bytes()
    events = [json.loads(line) for line in raw.splitlines()]
    assert raw.endswith(b"\n") and any(e["type"] != "track_ended" for e in events), events
    assert all(s["restarts"] == 0 for s in daemon.status()["stages"].values())


# --- bad model files ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_video(tmp_path_factory) -> Path:
    return write_video(tmp_path_factory.mktemp("video") / "small.avi", "MJPG", frames=25)


def run_daemon_expecting_failure(config: Path, timeout: float) -> tuple[int, str, float]:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "facewatch.daemon.cli", "run", "--config", str(config)],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - started


@pytest.mark.timeout(120)
def test_missing_model_is_refused_before_anything_starts(small_video, short_dir):
    missing = short_dir / "models" / "face_detector.onnx"
    config = pipeline_config(short_dir, [{"name": "cam", "uri": str(small_video), "loop": True}],
                             models={"detector": str(missing)})
    code, out, took = run_daemon_expecting_failure(config, 90)
    assert code == EXIT_SETUP, out   # 78, which systemd does not restart (was 2: restarted)
    assert (f"models.detector: file not found: {missing} (expected the face detector ONNX model"
            in out), out
    assert "started" not in out and "Traceback" not in out
    assert took < 60


@pytest.mark.timeout(240)
@pytest.mark.parametrize("fault", ["garbage", "truncated", "embedder-as-detector",
                                   "detector-as-embedder"])
def test_bad_model_stops_the_daemon_naming_the_file(fault, models, small_video, short_dir):
    """A model file that is there but unusable: the stage loading it exits 78 with one line
    naming the file and what was expected; the supervisor does not restart it but drains the
    others and exits 78, well before a restart loop could start."""
    detector, embedder = models
    bad = short_dir / "bad.onnx"
    if fault == "garbage":
        bad.write_bytes(os.urandom(4096))
        models_cfg = {"detector": str(bad)}
        expected = f"face detector {bad} is not a loadable ONNX model"
    elif fault == "truncated":
        bad.write_bytes(detector.read_bytes()[:detector.stat().st_size // 2])
        models_cfg = {"detector": str(bad)}
        expected = f"face detector {bad} is not a loadable ONNX model"
    elif fault == "embedder-as-detector":
        models_cfg = {"detector": str(embedder)}
        expected = f"face detector {embedder}: expected one input [N, 3, H, W]"
    else:
        models_cfg = {"embedder": str(detector)}
        expected = f"face embedder {detector}: "
    config = pipeline_config(short_dir, [{"name": "cam", "uri": str(small_video), "loop": True}],
                             models=models_cfg)
    code, out, took = run_daemon_expecting_failure(config, 200)
    assert code == EXIT_SETUP, out[-3000:]
    assert expected in out, out[-3000:]
    assert "stopped because" in out and "not restarting it" in out
    assert "restart #" not in out and "Traceback" not in out, out[-3000:]
    assert took < 150


# --- a subscriber that never reads; SIGTERM under load ---------------------------------------

class LineCounter:
    """Whole lines in a growing file, reading only what was appended since the last call."""

    def __init__(self, path: Path):
        self.path, self.offset, self.lines = path, 0, 0

    def __call__(self) -> int:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return 0
        self.offset += len(data)
        self.lines += data.count(b"\n")
        return self.lines


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


class Reader(threading.Thread):
    """A subscriber that keeps up: counts the events it receives."""

    def __init__(self, ctx: zmq.Context, endpoint: str):
        super().__init__(daemon=True)
        self.sock = ctx.socket(zmq.SUB)
        self.sock.linger = 0
        self.sock.subscribe(b"")
        self.sock.connect(endpoint)
        self.count = 0
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            if self.sock.poll(100):
                parse_event(self.sock.recv_multipart()[-1])
                self.count += 1
        self.sock.close(linger=0)


def stuck_subscriber(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    """Connects, subscribes, and never reads (tiny receive buffers so it is full at once)."""
    sock = ctx.socket(zmq.SUB)
    sock.linger = 0
    sock.rcvhwm = 1
    sock.setsockopt(zmq.RCVBUF, 4096)
    sock.subscribe(b"")
    monitor = sock.get_monitor_socket()
    sock.connect(endpoint)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if monitor.poll(100) and \
                recv_monitor_message(monitor)["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            monitor.close()
            return sock
    pytest.fail("the stuck subscriber never completed its handshake")


@pytest.mark.timeout(300)
def test_stuck_subscriber_neither_stalls_nor_bloats_publish_then_sigterm(short_dir, daemons):
    """The real publish stage (the test feeds it decisions as match would) with large events
    (snapshots). A subscriber that connects and never reads must not stop publish from taking
    decisions, nor the log and a reading subscriber from getting events, and the publish
    process must not buffer more than its high-water mark for it. Then SIGTERM while events
    are pouring in: exit 0 within 10 s and an event log of whole JSON lines."""
    hwm, px = 50, 160
    config = publish_only_config(short_dir, publish={"hwm": hwm, "snapshots": True,
                                                     "snapshot_quality": 95})
    cfg = yaml.safe_load(config.read_text())
    endpoint, log_path = cfg["publish"]["endpoint"], Path(cfg["publish"]["event_log"])
    logged = LineCounter(log_path)
    daemon = daemons(config, short_dir / "run")
    daemon.wait_ready(90)
    pid = daemon.stage("publish")["pid"]
    ctx = zmq.Context()
    reader = Reader(ctx, endpoint)
    reader.start()
    feed = DecisionFeed(short_dir / "run")
    rng = np.random.default_rng(0)
    pusher_stop = threading.Event()
    try:
        def push(n: int) -> float:
            started = time.monotonic()
            for _ in range(n):
                assert feed.send(decision(track_id=feed.sent + 1, snapshot_px=px, rng=rng)), \
                    "publish stopped taking decisions"
            wait_for(lambda: logged() >= feed.sent, 60, "publish to log every decision")
            return n / (time.monotonic() - started)

        wait_for(lambda: (feed.send(decision(track_id=feed.sent + 1)) and reader.count > 0), 30,
                 "the reading subscriber to get events")
        base_rate = push(300)                       # warm-up and baseline, nobody stuck
        event_kb = log_path.stat().st_size / feed.sent / 1024
        base_rss = rss_mb(pid)

        stuck = stuck_subscriber(ctx, endpoint)   # referenced until the end: GC would close it
        bound_mb = 48 + hwm * event_kb / 1024       # allocator slack + the queue HWM allows
        n = int(3 * bound_mb * 1024 / event_kb)     # unbounded buffering would pass the bound 3x
        peak = [base_rss]
        sampler_stop = threading.Event()

        def sample():
            while not sampler_stop.wait(0.1):
                peak[0] = max(peak[0], rss_mb(pid))
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        before = reader.count
        stuck_rate = push(n)
        sampler_stop.set()
        sampler.join()
        print(f"events {event_kb:.1f} KiB; {base_rate:.0f}/s alone, {stuck_rate:.0f}/s with a "
              f"stuck subscriber; publish RSS {base_rss:.0f} -> peak {peak[0]:.0f} MiB "
              f"(bound +{bound_mb:.0f}); reader got {reader.count - before} of {n}")
        assert feed.sender.timeouts == 0
        assert reader.count - before > 0, "the reading subscriber got nothing while one was stuck"
        assert peak[0] - base_rss < bound_mb, \
            f"publish grew {peak[0] - base_rss:.0f} MiB with a stuck subscriber"

        # SIGTERM under load, the stuck subscriber still attached
        def keep_pushing():
            while not pusher_stop.is_set() and \
                    feed.send(decision(track_id=feed.sent + 1, snapshot_px=px, rng=rng), 1.0):
                pass
        pusher = threading.Thread(target=keep_pushing, daemon=True)
        pusher.start()
        sent = feed.sent
        wait_for(lambda: logged() > sent + 50, 60, "events flowing before SIGTERM")
        started = time.monotonic()
        assert daemon.stop(10) == 0
        assert time.monotonic() - started < 10
        pusher_stop.set()
        pusher.join(10)
        assert not stuck.closed and stuck.poll(0), "the stuck subscriber was connected throughout"
    finally:
        pusher_stop.set()
        reader.stop.set()
        reader.join(5)
        feed.close()
        ctx.destroy(linger=0)   # the stuck subscriber too
    raw = log_path.read_bytes()
    assert raw.endswith(b"\n"), "the last event line is incomplete"
    events = [json.loads(line) for line in raw.splitlines()]   # every line whole
    assert [e["seq"] for e in events] == list(range(len(events)))
    assert len(events) <= feed.sent


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_stuck_subscriber_does_not_slow_the_pipeline_then_sigterm(models, short_video, short_dir,
                                                                  gallery_module, daemons):
    """The whole pipeline as fast as it goes (a looping file, realtime: false): frames keep
    being processed after a subscriber that never reads connects; then SIGTERM at full load
    exits 0 within 10 s and leaves only whole JSON lines in the event log."""
    config = pipeline_config(short_dir, [{"name": "cam", "uri": str(short_video.path),
                                          "loop": True, "realtime": False}],
                             publish={"snapshots": True})
    cfg = yaml.safe_load(config.read_text())
    port = cfg["metrics"]["port"]
    daemon = daemons(config, short_dir / "run")
    daemon.wait_ready(120)

    def processed() -> float:
        return metric(scrape(port), "facewatch_frames_processed_total", camera="cam")

    def rate_over(seconds: float) -> float:
        start, t0 = processed(), time.monotonic()
        time.sleep(seconds)   # a measuring window, not a wait for a condition
        return (processed() - start) / (time.monotonic() - t0)

    wait_for(lambda: processed() > 0, 120, "the first processed frames")
    alone = rate_over(4)
    ctx = zmq.Context()
    try:
        stuck = stuck_subscriber(ctx, cfg["publish"]["endpoint"])
        with_stuck = rate_over(4)
        print(f"frames processed: {alone:.1f}/s alone, {with_stuck:.1f}/s with a stuck subscriber")
        assert with_stuck > 0, "no frame processed while a subscriber was stuck"
        assert not stuck.closed
        started = time.monotonic()
        assert daemon.stop(10) == 0
        assert time.monotonic() - started < 10
    finally:
        ctx.destroy(linger=0)
    raw = Path(cfg["publish"]["event_log"]).read_bytes()
    assert not raw or raw.endswith(b"\n")
    events = [json.loads(line) for line in raw.splitlines()]
    assert [e["seq"] for e in events] == list(range(len(events)))
    assert all(s["restarts"] == 0 for s in daemon.status()["stages"].values())
