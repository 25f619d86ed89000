"""The pipeline: messages and sockets, voting, tracking; then the real supervisor and stages.

No-model tests run the real supervisor with only the capture stages local
(`supervisor.stages: [capture]`) while the test itself binds the frames socket, exactly as a
detect stage on another host would. Full-pipeline tests need the trained models in models/
and are skipped until they exist.
"""
from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
import zmq

from conftest import FaceVideo, read_jsonl, wait_for, write_config
from facewatch.stages.matcher import Matcher
from facewatch.stages.messages import (EVENT_SCHEMA, Control, EndOfStream, FaceCrops, FaceEmbeddings,
                             MessageError, SeqTracker, TrackDecision, VideoFrame, decode, encode,
                             event_json, parse_event)
from facewatch.stages.publish_stage import EventLog
from facewatch.stages.quality import QualityGate, sharpness
from facewatch.stages.transport import Defaults, Endpoints, Transport


def scrape(port: int) -> dict[tuple, float]:
    """GET /metrics over HTTP; {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def metric(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


# --- messages and transport ----------------------------------------------------------------

def crops_message(n=2, k=1, size=8) -> FaceCrops:
    rng = np.random.default_rng(n)
    return FaceCrops(camera="c", frame_index=7, pts=0.28, wall_ts=1.5, epoch=3,
                     track_ids=np.arange(n, dtype=np.int64), boxes=rng.random((n, 4), np.float32),
                     scores=np.full(n, 0.9, np.float32), blur=np.full(n, 50, np.float32),
                     crops=rng.integers(0, 255, (n, size, size, 3), np.uint8),
                     ended_tracks=np.arange(k, dtype=np.int64) + 10)


@pytest.mark.parametrize("msg", [
    VideoFrame(camera="cam", frame_index=1, pts=0.04, wall_ts=2.0, frame_width=64, frame_height=48,
               roi_x=4, roi_y=2, image=np.arange(40 * 60 * 3, dtype=np.uint8).reshape(40, 60, 3)),
    crops_message(),
    crops_message(n=0, k=3),
    FaceEmbeddings(camera="c", frame_index=1, pts=0.1, wall_ts=1.0, epoch=1,
                   track_ids=np.array([4], np.int64), boxes=np.ones((1, 4), np.float32),
                   embeddings=np.full((1, 16), 0.25, np.float32),
                   crops=np.zeros((0, 8, 8, 3), np.uint8), ended_tracks=np.zeros(0, np.int64)),
    TrackDecision(camera="c", type="recognized", track_id=4, name="obama", person_id=2,
                  similarity=0.71, threshold=0.5, votes=3, bbox=[1.0, 2.0, 3.0, 4.0],
                  frame_pts=1.2, capture_ts=5.0, snapshot=np.ones((1, 8, 8, 3), np.uint8)),
    TrackDecision(camera="c", type="unknown", track_id=5, name=None, person_id=None,
                  similarity=0.3, threshold=0.5, votes=1, bbox=[1.0, 2.0, 3.0, 4.0],
                  frame_pts=1.2, capture_ts=5.0, revision=2, first_pts=1.1,
                  stamps={"detect_recv": 5.01, "embed_done": 5.2, "match_done": 5.21}),
    EndOfStream(camera="c", reason="shutdown"),
], ids=lambda m: m.KIND)
def test_message_round_trip(msg):
    msg.sender, msg.instance, msg.seq = "detect", 42, 9
    frames = encode(msg)
    header = json.loads(frames[0])
    assert header["schema"] == 1 and header["kind"] == msg.KIND and header["seq"] == 9
    back = decode([bytes(f) for f in frames])
    assert type(back) is type(msg) and (back.sender, back.instance, back.seq) == ("detect", 42, 9)
    for name, value in vars(msg).items():
        got = getattr(back, name)
        if isinstance(value, np.ndarray):
            assert got.dtype == value.dtype and got.shape == value.shape and np.array_equal(got, value)
        else:
            assert got == value, name


def test_messages_are_validated():
    with pytest.raises(MessageError, match=r"FaceCrops.boxes must have shape \(2, 4\), got \(2, 3\)"):
        FaceCrops(**{**vars(crops_message()), "boxes": np.zeros((2, 3), np.float32)})
    with pytest.raises(MessageError, match="VideoFrame.image must have dtype uint8"):
        VideoFrame(camera="c", frame_index=0, pts=0, wall_ts=0, frame_width=1, frame_height=1,
                   image=np.zeros((1, 1, 3), np.float32))
    with pytest.raises(MessageError, match="type must be one of"):
        TrackDecision(camera="c", type="maybe", track_id=1, name=None, person_id=None,
                      similarity=None, threshold=0.5, votes=0, bbox=[0, 0, 1, 1], frame_pts=0,
                      capture_ts=0)
    frames = [bytes(f) for f in encode(EndOfStream(camera="c"))]
    header = json.loads(frames[0])
    for bad, match in [({**header, "schema": 2}, "schema version 2 not supported"),
                       ({**header, "kind": "Pickle"}, "unknown message kind"),
                       ({**header, "arrays": [{"name": "x", "dtype": "object", "shape": [1]}]},
                        "header lists 1 arrays")]:
        with pytest.raises(MessageError, match=match):
            decode([json.dumps(bad).encode()] + frames[1:])
    vf = [bytes(f) for f in encode(VideoFrame(camera="c", frame_index=0, pts=0, wall_ts=0,
                                              frame_width=2, frame_height=2,
                                              image=np.zeros((2, 2, 3), np.uint8)))]
    with pytest.raises(MessageError, match="payload has 11 bytes"):
        decode([vf[0], vf[1][:11]])
    with pytest.raises(MessageError, match="not JSON"):
        decode([b"\x80\x04pickle"])


def test_seq_tracker_counts_gaps_and_notices_restarts():
    seq = SeqTracker()

    def msg(instance, n):
        m = EndOfStream(camera="c")
        m.sender, m.instance, m.seq = "capture:c", instance, n
        return m
    assert [seq.check(msg(1, n)) for n in (0, 1, 2, 5, 6)] == [0, 0, 0, 2, 0]
    assert seq.check(msg(2, 0)) == 0      # restarted sender: a new sequence, not a gap


def test_transport_round_trip_over_ipc(short_dir):
    ep = Endpoints.for_runtime("ipc", short_dir)
    tx, rx = Transport(), Transport()
    try:
        receiver = rx.receiver(ep.faces)
        sender = tx.sender(ep.faces, "detect")
        for i in range(5):
            assert sender.send(crops_message(n=i % 3))
        got = [receiver.recv(5) for _ in range(5)]
        assert [m.seq for m in got] == list(range(5)) and {m.sender for m in got} == {"detect"}
        assert got[4].instance == os.getpid() and receiver.lost == 0
        server = rx.control_server(ep.control)
        client = tx.control_client(ep.control, "embed")
        client.send("eos", camera="c", reason="eof")
        ctl = wait_for(lambda: server.recv(0.2), 5, "a control message")
        assert (ctl.type, ctl.stage, ctl.camera, ctl.pid) == ("eos", "embed", "c", os.getpid())
        assert Control.from_json(ctl.to_json()) == ctl
        with pytest.raises(MessageError):
            Control.from_json(b'{"schema": "facewatch.control/1", "type": "reboot"}')
    finally:
        tx.close(linger_ms=0)
        rx.close(linger_ms=0)


def test_event_json_and_log_lines(tmp_path):
    event = {"schema": EVENT_SCHEMA, "type": "unknown", "seq": 0, "event_id": "x", "camera": "c",
             "track_id": 1, "name": None, "person_id": None, "similarity": 0.3, "threshold": 0.5,
             "votes": 3, "bbox": [1, 2, 3, 4], "frame_pts": 0.5, "ts": 2.0, "capture_ts": 1.9,
             "latency_ms": 100.0}
    assert parse_event(event_json(event)) == event
    with pytest.raises(MessageError, match="lacks fields"):
        event_json({k: v for k, v in event.items() if k != "camera"})
    with pytest.raises(ValueError):
        event_json({**event, "similarity": float("nan")})
    log = EventLog(tmp_path / "sub" / "events.jsonl")
    for i in range(3):
        log.write(event_json({**event, "seq": i}))
    log.close()
    assert [e["seq"] for e in read_jsonl(tmp_path / "sub" / "events.jsonl")] == [0, 1, 2]


# --- matcher, quality, tracking ---------------------------------------------------------

def unit(v):
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


@pytest.fixture
def matcher():
    m = Matcher(threshold=0.8, votes_needed=3, window=5)
    # two rows for alice (id 1), one for bob (id 2)
    m.set_gallery(np.array([1, 1, 2], np.int64), ["alice", "alice", "bob"],
                  unit([[1, 0, 0, 0], [0.9, 0.1, 0, 0], [0, 1, 0, 0]]))
    return m


def test_matcher_decides_once_after_enough_votes(matcher):
    key = ("cam", 1, 7)
    assert matcher.observe(key, unit([1, 0.05, 0, 0])) is None
    assert matcher.observe(key, unit([1, 0.1, 0, 0])) is None
    d = matcher.observe(key, unit([0.95, 0, 0.1, 0]))
    assert (d.person_id, d.name, d.votes) == (1, "alice", 3) and d.similarity > 0.9
    assert matcher.observe(key, unit([1, 0, 0, 0])) is None      # same outcome: no new event


def test_matcher_majority_unknown_and_changes(matcher):
    key = ("cam", 1, 8)
    votes = [unit([0, 1, 0, 0]), unit([0, 0, 1, 0]), unit([0, 0.95, 0.1, 0])]
    decisions = [matcher.observe(key, v) for v in votes]
    assert decisions[-1].person_id == 2 and decisions[-1].name == "bob"   # 2 of 3 for bob
    # the face changes (a track switched people): a tie with unknown already withdraws the
    # claim (window of 5: bob, unknown, bob, unknown), then nothing new until alice wins
    changes = [matcher.observe(key, unit([0, 0, 0, 1])) for _ in range(3)]
    assert [c.person_id if c else "-" for c in changes] == [None, "-", "-"]
    assert changes[0].name is None and changes[0].similarity < 0.8
    late = [matcher.observe(key, unit([1, 0, 0, 0])) for _ in range(5)]
    assert [d.name for d in late if d] == ["alice"]


def test_matcher_early_decision_then_an_update_from_the_full_vote():
    """first_votes=1: the first good crop decides at once; the decision stands until the full
    vote (votes_needed) is in, and changes only when that vote disagrees (issue 14)."""
    m = Matcher(threshold=0.8, votes_needed=3, window=5, first_votes=1)
    m.set_gallery(np.array([1, 2], np.int64), ["alice", "bob"], unit([[1, 0, 0, 0], [0, 1, 0, 0]]))
    key = ("cam", 1, 1)
    early = m.observe(key, unit([0, 0, 0, 1]), {"pts": 0.4})      # a poor first crop: unknown
    assert early is not None and early.person_id is None and early.votes == 1
    assert m.state(key).revision == 0 and m.state(key).first_pts == 0.4
    assert m.observe(key, unit([1, 0.05, 0, 0]), {"pts": 0.5}) is None  # stands until 3 votes
    update = m.observe(key, unit([1, 0.1, 0, 0]), {"pts": 0.6})
    assert (update.name, update.votes, m.state(key).revision) == ("alice", 3, 1)
    assert m.observe(key, unit([1, 0, 0, 0])) is None                   # same outcome: quiet
    # the early decision agrees with the full vote: one event only
    key2 = ("cam", 1, 2)
    assert m.observe(key2, unit([0, 1, 0, 0])).name == "bob"
    assert [m.observe(key2, unit([0, 1, 0.1, 0])) for _ in range(4)] == [None] * 4
    assert m.state(key2).revision == 0
    with pytest.raises(ValueError, match="first_votes"):
        Matcher(0.5, votes_needed=3, window=5, first_votes=4)


def test_matcher_ties_go_to_unknown_and_end_decides_late(matcher):
    key = ("cam", 1, 9)
    matcher.votes_needed = 2
    d = matcher.observe(key, unit([1, 0, 0, 0])) or matcher.observe(key, unit([0, 0, 0, 1]))
    assert d.person_id is None                      # one vote alice, one unknown: no claim
    key2 = ("cam", 1, 10)
    assert matcher.observe(key2, unit([0, 1, 0, 0])) is None
    late, state = matcher.end(key2)
    assert late.name == "bob" and state.decision is late and key2 not in matcher.tracks
    assert matcher.end(("cam", 1, 99)) == (None, None)


def test_matcher_uses_the_current_gallery(matcher):
    key = ("cam", 2, 1)
    carol = unit([0, 0, 0, 1])
    first = [matcher.observe(key, carol) for _ in range(3)][-1]
    assert first.person_id is None
    matcher.set_gallery(np.array([3], np.int64), ["carol"], carol[None])   # enrolled meanwhile
    assert matcher.observe(key, carol).name == "carol"
    empty = Matcher(0.5)
    assert empty.best_matches(unit([[1, 0]]))[0].tolist() == [-1]
    with pytest.raises(ValueError, match="threshold"):
        Matcher(1.5)


def test_quality_gate():
    gate = QualityGate(min_face_px=20, min_blur=30.0)
    boxes = np.array([[0, 0, 19, 40], [0, 0, 30, 30]], np.float32)
    assert gate.too_small(boxes).tolist() == [True, False]
    sharp = np.zeros((1, 32, 32, 3), np.uint8)
    sharp[0, ::2] = 255                                # stripes: high Laplacian variance
    flat = np.full((1, 32, 32, 3), 128, np.uint8)
    blur = sharpness(np.concatenate([sharp, flat]))
    assert gate.too_blurred(blur).tolist() == [False, True]
    assert not QualityGate(1, 0).too_blurred(blur).any()
    with pytest.raises(ValueError, match="min_face_px"):
        QualityGate(0, 1)


def test_tracker_keeps_ids_and_reports_ended_tracks():
    from facewatch.daemon.config import DetectConfig
    from facewatch.stages.detections import Detections
    from facewatch.stages.tracking import CameraTracker, tracker_args

    cfg = DetectConfig(track_buffer=3)
    for kind in ("bytetrack",):
        tracker = CameraTracker(kind, tracker_args(kind, cfg))
        image = np.zeros((240, 320, 3), np.uint8)
        ids = []
        for i in range(6):   # one face moving right, one standing still
            dets = Detections(np.array([[10 + 4 * i, 50, 60 + 4 * i, 110], [200, 40, 250, 100]],
                                       np.float32), np.array([0.9, 0.8], np.float32))
            tracks = tracker.update(dets, image)
            ids.append(sorted(tracks.track_ids.tolist()))
            assert not tracks.ended
        assert ids[-1] == ids[1] and len(ids[-1]) == 2, (kind, ids)
        assert sorted(tracks.boxes[:, 0].tolist()) == [30, 200]   # the detector's own boxes
        ended = []
        for _ in range(6):   # the faces leave: after track_buffer frames the tracks end
            ended += tracker.update(Detections.empty(), image).ended
        assert sorted(ended) == ids[-1], kind
        assert tracker.end_all() == []


# --- the real supervisor, no models needed ---------------------------------------------

class FramesSink:
    """The test as the detect stage of another host: binds the frames socket, reads frames."""

    def __init__(self, runtime_dir: Path):
        self.transport = Transport()
        self.rx = self.transport.receiver(Endpoints.for_runtime("ipc", runtime_dir).frames,
                                          hwm=Defaults.FRAME_RCVHWM)
        self.frames: list = []
        self.eos: list[EndOfStream] = []

    def pump(self, seconds: float = 0.2) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            msg = self.rx.recv(0.05)
            if isinstance(msg, EndOfStream):
                self.eos.append(msg)
            elif msg is not None:
                self.frames.append(msg)

    def until(self, condition, timeout: float, what: str):
        return wait_for(lambda: (self.pump(0.1), condition())[1], timeout, what, interval=0)

    def close(self):
        self.transport.close(linger_ms=0)


@pytest.fixture
def sink(short_dir):
    s = FramesSink(short_dir / "run")
    yield s
    s.close()


def capture_only_config(short_dir: Path, cameras: list[dict], nice: dict | None = None,
                        **sections) -> Path:
    return write_config(short_dir / "config.yaml", cameras, runtime={"dir": str(short_dir / "run")},
                        supervisor={"stages": ["capture"], "restart_initial_s": 0.2,
                                    **({"nice": nice} if nice is not None else {})}, **sections)


def test_killed_stage_is_restarted_and_counted(short_video, short_dir, sink, daemons):
    config = capture_only_config(short_dir, [
        {"name": "a", "uri": str(short_video.path), "loop": True},
        {"name": "b", "uri": str(short_video.path), "loop": True}], nice={"capture": 3})
    port = yaml.safe_load(config.read_text())["metrics"]["port"]
    daemon = daemons(config, short_dir / "run")
    daemon.wait_ready(60)
    sink.until(lambda: {f.camera for f in sink.frames} == {"a", "b"}, 30, "frames from a and b")
    old = daemon.stage("capture:a")["pid"]
    niceness = min(19, os.getpriority(os.PRIO_PROCESS, 0) + 3)   # supervisor.nice, on ours
    assert os.getpriority(os.PRIO_PROCESS, old) == niceness
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: daemon.stage("capture:a").get("restarts") == 1 and
             daemon.stage("capture:a").get("pid") not in (None, old), 30,
             "capture:a to be restarted with a new pid")
    sink.frames.clear()
    sink.until(lambda: any(f.camera == "a" and f.instance != old for f in sink.frames), 30,
               "frames from the restarted capture:a")
    assert any(f.camera == "b" for f in sink.frames), "camera b must keep running"
    assert daemon.stage("capture:b")["restarts"] == 0
    assert os.getpriority(os.PRIO_PROCESS, daemon.stage("capture:a")["pid"]) == niceness
    samples = wait_for(lambda: (s := scrape(port)) and
                       metric(s, "facewatch_stage_restarts_total", stage="capture:a") == 1 and s,
                       20, "the restart in /metrics")
    assert metric(samples, "facewatch_frames_captured_total", camera="b") > 0
    assert metric(samples, "facewatch_camera_up", camera="b") == 1
    assert metric(samples, "facewatch_stage_up", stage="capture:a") == 1
    assert daemon.stop(10) == 0
    # The daemon has exited; the sink's thread still drains the frames queued before the
    # EndOfStreams: 15 s was too short once at a load average of 8 on 2 cores.
    sink.until(lambda: {e.camera for e in sink.eos} == {"a", "b"}, 45, "EndOfStream of a and b")
    assert {e.reason for e in sink.eos} == {"shutdown"}


def test_daemon_exits_when_every_file_ended(short_video, short_dir, sink, daemons):
    config = capture_only_config(short_dir, [
        {"name": "x", "uri": str(short_video.path), "realtime": False},
        {"name": "y", "uri": str(short_video.path), "realtime": False, "fps_cap": 5}])
    daemon = daemons(config, short_dir / "run")
    sink.until(lambda: len(sink.eos) == 2, 60, "EndOfStream from both cameras")
    assert daemon.wait_exit(30) == 0
    by_cam = {c: [f.frame_index for f in sink.frames if f.camera == c] for c in "xy"}
    assert by_cam["x"] == list(range(short_video.frames))
    assert 4 <= len(by_cam["y"]) <= 6
    assert {e.reason for e in sink.eos} == {"eof"}
    assert {s["state"] for s in daemon.status()["stages"].values()} == {"finished"}


def test_failing_camera_does_not_stop_the_others(short_video, short_dir, sink, daemons):
    config = capture_only_config(short_dir, [
        {"name": "good", "uri": str(short_video.path), "loop": True},
        {"name": "bad", "uri": "rtsp://user:topsecret@127.0.0.1:9/none"}],
        capture={"reconnect_initial_s": 0.1, "reconnect_max_s": 0.5, "open_timeout_s": 1})
    port = yaml.safe_load(config.read_text())["metrics"]["port"]
    daemon = daemons(config, short_dir / "run")
    daemon.wait_ready(60)
    sink.until(lambda: len([f for f in sink.frames if f.camera == "good"]) > 20, 30,
               "frames from the good camera")
    samples = wait_for(lambda: (s := scrape(port)) and
                       metric(s, "facewatch_camera_reconnects_total", camera="bad") >= 2 and s,
                       30, "reconnect attempts of the bad camera")
    assert metric(samples, "facewatch_camera_up", camera="good") == 1
    assert metric(samples, "facewatch_camera_up", camera="bad") == 0
    assert daemon.stage("capture:bad")["restarts"] == 0     # retried inside, never crashed
    assert daemon.stop(10) == 0
    text = daemon.log_text()
    assert "topsecret" not in text and "user:***@127.0.0.1" in text


# --- the full pipeline with the trained models ------------------------------------------

def pipeline_config(short_dir: Path, cameras: list[dict], **sections) -> Path:
    sections.setdefault("detect", {})
    sections["detect"] = {"track_buffer": 5, "batch_max": 4, **sections["detect"]}
    return write_config(short_dir / "config.yaml", cameras, runtime={"dir": str(short_dir / "run")},
                        **sections)


class Subscriber:
    """A real ZeroMQ SUB on the daemon's event endpoint, connected before the daemon starts."""

    def __init__(self, endpoint: str):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.connect(endpoint)
        self.events: list[dict] = []

    def pump(self) -> list[dict]:
        while self.sock.poll(50):
            self.events.append(parse_event(self.sock.recv_multipart()[-1]))
        return self.events

    def close(self):
        self.sock.close(linger=0)
        self.ctx.term()


@pytest.fixture
def subscriber():
    subs = []
    yield lambda endpoint: subs.append(Subscriber(endpoint)) or subs[-1]
    for s in subs:
        s.close()


def enroll_people(gallery: Path, train_dir: Path, detector: Path, embedder: Path) -> list[str]:
    from facewatch.daemon.enrollment import EnrollmentError, enroll_images
    from facewatch.stages.face_detector import FaceDetector
    from facewatch.stages.face_embedder import FaceEmbedder
    from facewatch.stages.face_landmarks import landmarks_to_run
    from facewatch.stages.gallery import Gallery

    emb = FaceEmbedder(embedder, ["CPUExecutionProvider"], threads=1)
    # as the daemon's detect stage: landmarks for an embedder that aligns on them
    det = FaceDetector(detector, ["CPUExecutionProvider"], threads=1, landmarks=landmarks_to_run(
        emb.crop_spec.alignment, Path(detector).parent / "face_landmarks.onnx"))
    names = []
    with Gallery(gallery) as g:
        for person in sorted(p for p in train_dir.iterdir() if p.is_dir()):
            for photo in sorted(person.glob("*.jp*g")):   # one by one: a refused photo
                try:                                      # must not cost the person the others
                    enroll_images(g, person.name, [photo], det, emb)
                except EnrollmentError as exc:
                    print(f"not enrolled: {exc}")
                    continue
                if person.name not in names:
                    names.append(person.name)
    return names


def segment_of(video: FaceVideo, pts: float) -> dict | None:
    frame = round(pts * video.fps)
    return next((s for s in video.segments if s["first"] <= frame <= s["last"] + 6), None)


@pytest.mark.slow
def test_recognizes_enrolled_people_end_to_end(models, knn_dir, face_video, short_dir,
                                              gallery_module, daemons, subscriber):
    detector, embedder = models
    # The daemon's own operating point (match.target_far, issue 13): at the permissive
    # pair-accuracy threshold a first decision from one crop named a stranger's face once the
    # detector found more faces (issue 11), which is what the open-set point is for.
    config = pipeline_config(short_dir, [{"name": "lobby", "uri": str(face_video.path),
                                          "realtime": False}])
    cfg = yaml.safe_load(config.read_text())
    enrolled = enroll_people(Path(cfg["gallery"]["path"]), knn_dir / "train", detector, embedder)
    assert len(enrolled) >= 4, f"only {enrolled} could be enrolled: is the detector trained?"
    sub = subscriber(cfg["publish"]["endpoint"])
    daemon = daemons(config, short_dir / "run")
    code = daemon.wait_exit(240)          # a file that does not loop: exits after the last event
    assert code == 0, daemon.log_text()[-3000:]
    events = wait_for(lambda: len(sub.pump()) == len(read_jsonl(Path(cfg["publish"]["event_log"])))
                      and sub.events, 10, "the subscriber to have every logged event")
    logged = read_jsonl(Path(cfg["publish"]["event_log"]))
    assert [e["event_id"] for e in events] == [e["event_id"] for e in logged]
    assert [e["seq"] for e in logged] == list(range(len(logged)))
    recognized = [e for e in logged if e["type"] == "recognized"]
    seen: dict[str, set[str]] = {}
    for e in recognized:
        seg = segment_of(face_video, e["frame_pts"])
        assert seg is not None, f"recognition outside any photo: {e}"
        assert e["name"] in seg["names"], f"{e['name']} recognised in {seg['photo']}: {e}"
        assert e["similarity"] >= e["threshold"] and e["camera"] == "lobby"
        x1, y1, x2, y2 = e["bbox"]
        assert 0 <= x1 < x2 <= face_video.size[0] and 0 <= y1 < y2 <= face_video.size[1]
        seen.setdefault(seg["photo"], set()).add(e["name"])
    # never a wrong name, and recognition works end to end; how many enrolled appearances get
    # named is the embedder's figure (2 of 7 at this operating point with the shipped one:
    # evaluate-oneshot and models/README.md measure it, issue 12)
    appearances = named = 0
    for seg in face_video.segments:
        expected = set(seg["names"]) & set(enrolled)
        assert seen.get(seg["photo"], set()) <= expected, (seg, seen)
        appearances += len(expected)
        named += len(seen.get(seg["photo"], set()))
    assert named >= 2 and len(set().union(*seen.values())) >= 2, (named, appearances, seen)
    # one decision per track (plus re-check changes), never one per frame
    per_track = {}
    for e in logged:
        if e["type"] != "track_ended":
            per_track[e["track_id"]] = per_track.get(e["track_id"], 0) + 1
    assert max(per_track.values()) <= 3, per_track
    ended = {e["track_id"] for e in logged if e["type"] == "track_ended"}
    assert ended == set(per_track), "every decided track ends with a track_ended event"
    assert all(e["latency_ms"] >= 0 for e in logged)
    # issue 14: a track's first decision comes from its first good crop (embed.first_votes 1),
    # later ones are numbered updates; every decision says where its latency went
    for tid in per_track:
        decisions = [e for e in logged if e["track_id"] == tid and e["type"] != "track_ended"]
        assert [e["revision"] for e in decisions] == list(range(len(decisions)))
        assert decisions[0]["votes"] == 1 and decisions[0]["first_pts"] == decisions[0]["frame_pts"]
        for e in decisions:
            steps = e["timing_ms"]
            assert list(steps) == ["queued", "detect_batch_wait", "detect", "to_embed",
                                   "embed_batch_wait", "embed", "match", "publish"], steps
            assert min(steps.values()) >= 0 and abs(sum(steps.values()) - e["latency_ms"]) < 1.5


@pytest.mark.slow
def test_events_metrics_kill_restart_and_sigterm_drain(models, face_video, short_dir,
                                                      gallery_module, daemons, subscriber):
    """A looping camera through the real pipeline: events on the SUB socket and the log, a
    /metrics scrape, detect SIGKILLed and restarted with events resuming, then SIGTERM: exit 0
    within 10 s with every event flushed as whole lines."""
    config = pipeline_config(short_dir, [{"name": "loop", "uri": str(face_video.path),
                                          "loop": True}], publish={"snapshots": True})
    cfg = yaml.safe_load(config.read_text())
    sub = subscriber(cfg["publish"]["endpoint"])
    daemon = daemons(config, short_dir / "run")
    daemon.wait_ready(120)
    wait_for(lambda: len([e for e in sub.pump() if e["type"] != "track_ended"]) >= 1, 120,
             "the first decisions")
    decision = next(e for e in sub.events if e["type"] != "track_ended")
    assert decision["schema"] == EVENT_SCHEMA and decision["name"] is None   # empty gallery
    assert decision["type"] == "unknown" and decision["snapshot_jpeg"]
    samples = scrape(cfg["metrics"]["port"])
    for name, labels in [("facewatch_frames_captured_total", {"camera": "loop"}),
                         ("facewatch_frames_processed_total", {"camera": "loop"}),
                         ("facewatch_faces_detected_total", {"camera": "loop"}),
                         ("facewatch_recognitions_total", {"camera": "loop", "result": "unknown"}),
                         ("facewatch_batch_size_count", {"stage": "detect"}),
                         ("facewatch_end_to_end_latency_seconds_count", {"camera": "loop"})]:
        assert metric(samples, name, **labels) > 0, name
    assert any(k[0] == "facewatch_execution_provider" and v == 1 for k, v in samples.items())

    old = daemon.stage("detect")["pid"]
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: daemon.stage("detect").get("restarts") == 1 and
             daemon.stage("detect").get("ready"), 120, "detect to restart and be ready")
    count = len(sub.pump())
    wait_for(lambda: len([e for e in sub.pump()[count:] if e["type"] != "track_ended"]) >= 1,
             120, "events after the restart")
    assert metric(scrape(cfg["metrics"]["port"]), "facewatch_stage_restarts_total",
                  stage="detect") == 1

    started = time.monotonic()
    assert daemon.stop(10) == 0
    assert time.monotonic() - started < 10
    raw = Path(cfg["publish"]["event_log"]).read_bytes()
    assert raw.endswith(b"\n")
    logged = [json.loads(line) for line in raw.splitlines()]
    sub.pump()
    assert [e["event_id"] for e in logged][:len(sub.events)] == [e["event_id"] for e in sub.events]


@pytest.mark.slow
def test_enrollment_is_picked_up_without_restart(models, knn_dir, face_video, short_dir,
                                                gallery_module, daemons, subscriber):
    detector, embedder = models
    config = pipeline_config(short_dir, [{"name": "cam", "uri": str(face_video.path),
                                          "loop": True}], embed={"recheck_interval_s": 0.5})
    cfg = yaml.safe_load(config.read_text())
    sub = subscriber(cfg["publish"]["endpoint"])
    daemon = daemons(config, short_dir / "run")
    daemon.wait_ready(120)
    wait_for(lambda: any(e["type"] == "unknown" for e in sub.pump()), 120, "an unknown face")
    enroll_people(Path(cfg["gallery"]["path"]), knn_dir / "train", detector, embedder)
    wait_for(lambda: any(e["type"] == "recognized" for e in sub.pump()), 120,
             "a recognition after enrolling, without a restart")
    assert daemon.stage("match")["restarts"] == 0
    assert daemon.stop(10) == 0


def test_embed_selection_takes_a_tracks_first_votes_then_one_per_recheck_interval():
    from facewatch.stages.embed_selection import EmbedSelection

    sel = EmbedSelection(votes=3, recheck_interval_s=2.0, first_votes=1)
    ids = np.array([7, 8], np.int64)
    firsts, taken = [], {7: [], 8: []}
    for frame in range(100):   # 4 s at 25 fps; track 8 blurred (never taken) on odd frames
        pts = frame / 25
        wanted = sel.wanted("cam", ids, pts)
        for tid, want in zip(ids.tolist(), wanted.tolist()):
            if want and not (tid == 8 and frame % 2):
                firsts.append(sel.take("cam", tid, pts))
                taken[tid].append(frame)
    assert taken[7] == [0, 1, 2, 52] and taken[8] == [0, 2, 4, 54]
    assert firsts.count(True) == 2   # the first crop of each track
    assert sel.wanted("other", ids, 0.0).all()    # cameras are apart
    sel.forget("cam", [7])
    assert sel.wanted("cam", ids, 4.0).tolist() == [True, False]
    sel.forget_camera("cam")
    assert len(sel) == 0
