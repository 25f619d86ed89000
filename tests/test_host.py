"""What a production host does to a daemon, each situation created for real against the real
daemon: a disk that fills under the event log (a 64 KiB tmpfs), logrotate and SIGHUP, a gallery
file deleted and created again by `facewatch enroll`, a stage SIGKILLed (event identity), a
taken port, a camera that never connects. No connected subscriber may lose an event.

The stall of an RTSP camera (connection open, no data) is in test_capture, beside the other
RTSP tests.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
import zmq

from conftest import EMBEDDER, REPO, wait_for
from decision_feed import DecisionFeed, decision, publish_only_config
from facewatch.stages.messages import FaceEmbeddings, parse_event
from facewatch.stages.transport import Endpoints, Transport
from test_pipeline import metric, scrape, sink  # noqa: F401  (sink: a fixture)


# --- helpers -------------------------------------------------------------------------------

class EventSubscriber(threading.Thread):
    """A real SUB socket that keeps up and keeps every event it got."""

    def __init__(self, endpoint: str):
        super().__init__(daemon=True)
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.linger = 0
        self.sock.subscribe(b"")
        self.sock.connect(endpoint)
        self.events: list[dict] = []
        self.stop = threading.Event()
        self.start()

    def run(self):
        while not self.stop.is_set():
            if self.sock.poll(50):
                self.events.append(parse_event(self.sock.recv_multipart()[-1]))
        self.sock.close(linger=0)

    def close(self):
        self.stop.set()
        self.join(5)
        self.ctx.term()


@pytest.fixture
def subscribers():
    subs: list[EventSubscriber] = []
    yield lambda endpoint: subs.append(EventSubscriber(endpoint)) or subs[-1]
    for s in subs:
        s.close()


def connect(feed: DecisionFeed, sub: EventSubscriber) -> int:
    """Send decisions until the subscriber gets one (ZeroMQ's slow joiner); from the returned
    seq on, the subscriber is connected and must get every event."""
    wait_for(lambda: feed.send(decision(track_id=feed.sent + 1)) and sub.events, 30,
             "the subscriber to receive its first event")
    return sub.events[0]["seq"]


def assert_nothing_lost(sub: EventSubscriber, first_seq: int, last_seq: int) -> None:
    wait_for(lambda: sub.events and sub.events[-1]["seq"] >= last_seq, 20,
             f"the subscriber to get every event up to seq {last_seq}")
    seqs = [e["seq"] for e in sub.events]
    assert seqs == list(range(first_seq, last_seq + 1)), "a connected subscriber lost events"


def log_lines(path: Path) -> list[dict]:
    """Every line of the event log, each of which must be a whole JSON object."""
    raw = path.read_bytes() if path.exists() else b""
    assert not raw or raw.endswith(b"\n"), f"half a line at the end of {path}: {raw[-80:]!r}"
    return [json.loads(line) for line in raw.splitlines()]


def daemon_lines(daemon) -> str:
    """The daemon's log without the per-event lines."""
    return "\n".join(line for line in daemon.log_text().splitlines()
                     if "facewatch.publish: unknown camera=" not in line)


@pytest.fixture
def small_disk(tmp_path):
    """A real 64 KiB file system (tmpfs), so the event log's disk really fills."""
    if os.geteuid() != 0:
        pytest.skip("mounting a 64 KiB tmpfs needs root (mount -t tmpfs)")
    path = tmp_path / "disk"
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield path
    subprocess.run(["umount", "-l", str(path)], check=False)


# --- 1. the event log's disk fills ---------------------------------------------------------

@pytest.mark.timeout(180)
def test_full_disk_never_stops_events_and_the_log_resumes(short_dir, small_disk, daemons,
                                                          subscribers):
    """The event log sits on a 64 KiB tmpfs that a filler file nearly fills. While the disk is
    full every event still reaches the subscriber, the log holds only whole lines, publish is
    not restarted, the failure is logged once and exported; once the filler is deleted the log
    catches up by itself with every event, in order."""
    log_path = small_disk / "events.jsonl"
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * 44 * 1024)
    config = publish_only_config(short_dir, publish={"event_log": str(log_path)})
    cfg = yaml.safe_load(config.read_text())
    port = cfg["metrics"]["port"]
    daemon = daemons(config, short_dir / "run")
    daemon.wait_ready(90)
    sub = subscribers(cfg["publish"]["endpoint"])
    feed = DecisionFeed(short_dir / "run")
    try:
        first = connect(feed, sub)
        for _ in range(110):   # ~40 KB of events for ~20 KB of free space
            assert feed.send(decision(track_id=feed.sent + 1)), "publish stopped taking decisions"
        assert_nothing_lost(sub, first, feed.sent - 1)
        samples = wait_for(lambda: (s := scrape(port)) and
                           metric(s, "facewatch_event_log_up") == 0 and s, 20,
                           "facewatch_event_log_up to go to 0")
        errors = metric(samples, "facewatch_event_log_write_errors_total", error="ENOSPC")
        assert errors >= 1
        logged = log_lines(log_path)
        assert 10 < len(logged) < feed.sent, "the disk was expected to fill part-way"
        assert [e["seq"] for e in logged] == list(range(len(logged)))
        text = daemon_lines(daemon)
        assert text.count("cannot write (No space left on device") == 1, text

        filler.unlink()                          # space returns
        wait_for(lambda: len(log_lines(log_path)) == feed.sent, 10,
                 "the event log to catch up once space returned")
        assert [e["seq"] for e in log_lines(log_path)] == list(range(feed.sent))
        for _ in range(5):
            assert feed.send(decision(track_id=feed.sent + 1))
        wait_for(lambda: len(log_lines(log_path)) == feed.sent, 10, "new events in the log")
        assert_nothing_lost(sub, first, feed.sent - 1)
        samples = wait_for(lambda: (s := scrape(port)) and
                           metric(s, "facewatch_event_log_up") == 1 and s, 10,
                           "facewatch_event_log_up back to 1")
        assert metric(samples, "facewatch_event_log_lost_total") == 0
        text = daemon_lines(daemon)
        assert text.count("writing again; no line lost") == 1, text
        assert daemon.stage("publish")["restarts"] == 0
        assert "Traceback" not in text
        assert daemon.stop(10) == 0
    finally:
        feed.close()


# --- 3. SIGHUP: logrotate, and never a stop ------------------------------------------------

@pytest.mark.timeout(180)
def test_sighup_reopens_the_event_log_after_logrotate_and_never_stops(short_dir, daemons,
                                                                      subscribers):
    """logrotate's `create` rotation: the log is renamed, then SIGHUP (the unit's ExecReload).
    The daemon goes on, later events go to a new 0600 file at the configured path, nothing is
    lost or restarted; a burst of SIGHUPs changes nothing."""
    config = publish_only_config(short_dir)
    cfg = yaml.safe_load(config.read_text())
    log_path = Path(cfg["publish"]["event_log"])
    daemon = daemons(config, short_dir / "run")
    daemon.wait_ready(90)
    sub = subscribers(cfg["publish"]["endpoint"])
    feed = DecisionFeed(short_dir / "run")
    try:
        first = connect(feed, sub)
        for _ in range(10):
            assert feed.send()
        wait_for(lambda: len(log_lines(log_path)) == feed.sent, 10, "events in the log")
        rotated = log_path.with_name("events.jsonl.1")
        os.rename(log_path, rotated)
        os.kill(daemon.proc.pid, signal.SIGHUP)
        wait_for(lambda: log_path.exists(), 5, "the event log reopened at its path")
        before = feed.sent
        for _ in range(10):
            assert feed.send()
        for _ in range(5):
            os.kill(daemon.proc.pid, signal.SIGHUP)
        for _ in range(10):
            assert feed.send()
        wait_for(lambda: len(log_lines(log_path)) == feed.sent - before, 10,
                 "later events in the new file")
        assert_nothing_lost(sub, first, feed.sent - 1)
        seqs = [e["seq"] for e in log_lines(rotated) + log_lines(log_path)]
        assert seqs == list(range(feed.sent)), "every event in one of the two files, in order"
        assert (log_path.stat().st_mode & 0o777) == 0o600
        assert daemon.proc.poll() is None, "SIGHUP stopped the daemon"
        assert daemon.stage("publish")["restarts"] == 0
        assert "SIGHUP: reloading" in daemon.log_text()
        assert daemon.stop(10) == 0
    finally:
        feed.close()


# --- 2. the gallery file is replaced while the daemon runs -----------------------------------

def embedder_dim() -> int:
    import onnx

    model = onnx.load(str(EMBEDDER), load_external_data=False)
    return model.graph.output[0].type.tensor_type.shape.dim[1].dim_value


def unit_vector(dim: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


class EmbeddingFeed:
    """The test as the embed stage: PUSHes FaceEmbeddings into the daemon's match stage."""

    def __init__(self, runtime_dir: Path):
        self.transport = Transport()
        self.sender = self.transport.sender(Endpoints.for_runtime("ipc", runtime_dir).embeddings,
                                            "embed")
        self.frame = 0

    def _send(self, track_ids: list[int], vectors: list[np.ndarray], ended: list[int]) -> None:
        n = len(track_ids)
        dim = len(vectors[0]) if vectors else 1
        msg = FaceEmbeddings(
            camera="door", frame_index=self.frame, pts=self.frame / 25, wall_ts=time.time(),
            epoch=1, track_ids=np.asarray(track_ids, np.int64),
            boxes=np.tile(np.array([10, 20, 110, 140], np.float32), (n, 1)),
            embeddings=np.asarray(vectors, np.float32).reshape(n, dim),
            crops=np.zeros((0, 8, 8, 3), np.uint8), ended_tracks=np.asarray(ended, np.int64))
        self.frame += 1
        assert self.sender.send(msg), "match stopped taking embeddings"

    def track(self, track_id: int, vector: np.ndarray, votes: int = 3) -> None:
        """One track: `votes` frames of the same face (a decision), then its end."""
        for _ in range(votes):
            self._send([track_id], [vector], [])
        self._send([], [], [track_id])

    def close(self) -> None:
        self.transport.close(linger_ms=0)


def decided(sub: EventSubscriber, track_id: int) -> dict:
    return wait_for(lambda: next((e for e in sub.events if e["track_id"] == track_id and
                                  e["type"] != "track_ended"), None), 30,
                    f"the decision on track {track_id}")


def enroll_cli(gallery: Path, name: str, photo: Path) -> str:
    proc = subprocess.run([sys.executable, "-m", "facewatch.daemon.cli", "enroll", "--gallery", str(gallery),
                           "--name", name, "--cpu", str(photo)], cwd=REPO, capture_output=True,
                          text=True, timeout=240, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def match_config(short_dir: Path, **sections) -> Path:
    return publish_only_config(short_dir, stages=("match", "publish"), **sections)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("leftovers", ["removed", "stale-wal"])
def test_replaced_gallery_is_noticed_and_reloaded(leftovers, models, knn_dir, short_dir, daemons,
                                                  subscribers, gallery_module):
    """The gallery is deleted (with its -wal/-shm, or they are left behind holding the old
    file's un-checkpointed pages) and created again by `facewatch enroll` with someone else.
    Meanwhile the daemon matches with the last good gallery; the missing file is logged once and
    exported; the new file is picked up by its new inode and the old person is gone. Nothing is
    restarted, nothing logged as malformed, no event lost."""
    from facewatch.stages.gallery import Gallery, file_model_id

    config = match_config(short_dir)
    cfg = yaml.safe_load(config.read_text())
    path, port = Path(cfg["gallery"]["path"]), cfg["metrics"]["port"]
    dim, model_id = embedder_dim(), file_model_id(EMBEDDER)
    alice = unit_vector(dim, 1)
    with Gallery(path) as g:
        g.enroll("alice", alice[None], model_id, ["test"])
    daemon = daemons(config, short_dir / "run")
    daemon.wait_ready(90)
    sub = subscribers(cfg["publish"]["endpoint"])
    feed = EmbeddingFeed(short_dir / "run")
    try:
        tid = iter(range(1, 1000))
        wait_for(lambda: (feed.track(next(tid), alice), sub.events)[1], 30,
                 "the subscriber's first event")
        first_seq = sub.events[0]["seq"]
        assert decided(sub, next(tid) - 1)["name"] == "alice"
        if leftovers == "stale-wal":
            # A write the daemon has not checkpointed: the -wal now holds pages of this file.
            with Gallery(path) as g:
                g.enroll("carol", unit_vector(dim, 3)[None], model_id, ["test"])
            assert Path(f"{path}-wal").stat().st_size > 0
            saved = {s: Path(f"{path}{s}").read_bytes() for s in ("-wal", "-shm")}
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        wait_for(lambda: metric(scrape(port), "facewatch_gallery_ok") == 0, 10,
                 "facewatch_gallery_ok to go to 0")
        t = next(tid)
        feed.track(t, alice)
        assert decided(sub, t)["name"] == "alice", "matching must go on with the last gallery"
        if leftovers == "stale-wal":
            for suffix, data in saved.items():
                Path(f"{path}{suffix}").write_bytes(data)
        out = enroll_cli(path, "bob", knn_dir / "train" / "biden" / "biden.jpg")
        if leftovers == "stale-wal":
            assert "left behind by a deleted gallery" in out, out
        with Gallery(path, create=False) as g:
            assert [p.name for p in g.persons()] == ["bob"]
            bob = g.snapshot().embeddings[0]
        # The new file can be opened between its creation and bob's enrollment (two
        # transactions): gallery_ok is 1 then with nobody in it, and bob follows on the next poll.
        samples = wait_for(lambda: (s := scrape(port)) and
                           metric(s, "facewatch_gallery_ok") == 1 and
                           metric(s, "facewatch_gallery_people") == 1 and s, 10,
                           "facewatch_gallery_ok back to 1 with bob loaded")
        assert metric(samples, "facewatch_gallery_reloads_total", reason="replaced") >= 1
        t = next(tid)
        feed.track(t, bob)
        assert decided(sub, t)["name"] == "bob"
        t = next(tid)
        feed.track(t, alice)
        assert decided(sub, t)["type"] == "unknown", "the old gallery is no longer used"
        wait_for(lambda: sub.events[-1]["track_id"] == t and
                 sub.events[-1]["type"] == "track_ended", 10, "the last track_ended")
        assert_nothing_lost(sub, first_seq, sub.events[-1]["seq"])
        text = daemon.log_text()
        assert text.count(f"gallery {path} is missing") == 1, text[-3000:]
        assert "malformed" not in text and "Traceback" not in text
        assert daemon.stage("match")["restarts"] == 0
        assert daemon.stop(10) == 0
    finally:
        feed.close()


@pytest.mark.timeout(180)
def test_sighup_reloads_the_gallery(models, short_dir, daemons, subscribers, gallery_module):
    """Polling is off (an hour): a gallery moved into place is used after SIGHUP, at once."""
    from facewatch.stages.gallery import Gallery, file_model_id

    config = match_config(short_dir, gallery={"poll_interval_s": 3600})
    cfg = yaml.safe_load(config.read_text())
    path = Path(cfg["gallery"]["path"])
    dim, model_id = embedder_dim(), file_model_id(EMBEDDER)
    alice, dave = unit_vector(dim, 1), unit_vector(dim, 4)
    with Gallery(path) as g:
        g.enroll("alice", alice[None], model_id, ["test"])
    daemon = daemons(config, short_dir / "run")
    daemon.wait_ready(90)
    sub = subscribers(cfg["publish"]["endpoint"])
    feed = EmbeddingFeed(short_dir / "run")
    try:
        tid = iter(range(1, 1000))
        wait_for(lambda: (feed.track(next(tid), dave), sub.events)[1], 30,
                 "the subscriber's first event")
        assert decided(sub, next(tid) - 1)["type"] == "unknown"
        staged = path.with_name("staged.db")
        with Gallery(staged) as g:
            g.enroll("dave", dave[None], model_id, ["test"])
        os.replace(staged, path)
        os.kill(daemon.proc.pid, signal.SIGHUP)
        wait_for(lambda: "gallery loaded: 1 people" in
                 daemon.log_text().partition(f"gallery {path} opened (SIGHUP)")[2], 10,
                 "the gallery reloaded after SIGHUP")
        t = next(tid)
        feed.track(t, dave)
        assert decided(sub, t)["name"] == "dave", daemon.log_text()[-3000:]
        assert daemon.proc.poll() is None
        assert all(s["restarts"] == 0 for s in daemon.status()["stages"].values())
        assert daemon.stop(10) == 0
    finally:
        feed.close()


# --- issue 13, item 6: read-only and too-open galleries ----------------------------------------

@pytest.fixture
def read_only_folder(tmp_path):
    """A folder whose files cannot be written: a tmpfs remounted read-only when root (root
    writes any file whatever its mode), else mode 0555 with 0444 files."""
    path = tmp_path / "ro"
    path.mkdir()
    mounted = False
    if os.geteuid() == 0:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)],
                           capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        mounted = True

    def make_read_only():
        if mounted:
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        else:
            for f in path.iterdir():
                f.chmod(0o444)
            path.chmod(0o555)
    yield path, make_read_only
    if mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)
    else:
        path.chmod(0o755)


def test_read_only_gallery_is_named_as_such(read_only_folder, gallery_module):
    from facewatch.stages.gallery import Gallery, GalleryError

    folder, make_read_only = read_only_folder
    path = folder / "gallery.db"
    with Gallery(path) as g:
        g.enroll("alice", unit_vector(8, 1)[None], "m", ["test"])
    make_read_only()
    with pytest.raises(GalleryError, match=f"gallery {path} is read-only") as err:
        Gallery(path, create=False)
    assert "not a facewatch gallery" not in str(err.value)
    proc = subprocess.run([sys.executable, "-m", "facewatch.daemon.cli", "gallery", "--gallery", str(path),
                           "list"], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode != 0
    assert f"gallery {path} is read-only" in proc.stderr, proc.stderr
    assert "not a facewatch gallery" not in proc.stderr


@pytest.mark.parametrize("mode", [0o444, 0o644, 0o660])
def test_enrolling_into_a_too_open_gallery_makes_it_owner_only(mode, models, knn_dir, tmp_path,
                                                              gallery_module):
    from facewatch.stages.gallery import Gallery

    path = tmp_path / "gallery.db"
    Gallery(path).close()
    path.chmod(mode)
    out = enroll_cli(path, "bob", knn_dir / "train" / "biden" / "biden.jpg")
    assert f"had mode {mode:04o}; set to 0600" in out, out
    assert (path.stat().st_mode & 0o777) == 0o600
    for suffix in ("-wal", "-shm"):
        extra = Path(f"{path}{suffix}")
        assert not extra.exists() or (extra.stat().st_mode & 0o777) == 0o600


# --- issue 13, item 2: camera_up from the start ----------------------------------------------

@pytest.mark.timeout(120)
def test_camera_up_is_exported_for_cameras_that_never_connected(short_video, short_dir, sink,
                                                                daemons):
    """A refused RTSP camera and a missing file are exported as camera_up 0 (not absent), the
    good camera as 1; SIGHUP leaves the captures running."""
    from conftest import free_port
    from test_pipeline import capture_only_config

    config = capture_only_config(short_dir, [
        {"name": "good", "uri": str(short_video.path), "loop": True},
        {"name": "refused", "uri": f"rtsp://127.0.0.1:{free_port()}/none"},
        {"name": "missing", "uri": str(short_dir / "not-there.mp4")}],
        capture={"reconnect_initial_s": 0.5, "reconnect_max_s": 2, "open_timeout_s": 1})
    port = yaml.safe_load(config.read_text())["metrics"]["port"]
    daemon = daemons(config, short_dir / "run")
    daemon.wait_ready(60)
    sink.until(lambda: any(f.camera == "good" for f in sink.frames), 30, "frames from good")
    samples = wait_for(lambda: (s := scrape(port)) and
                       metric(s, "facewatch_camera_up", camera="good") == 1 and s, 20,
                       "camera_up of the good camera")
    for camera in ("refused", "missing"):
        key = ("facewatch_camera_up", (("camera", camera),))
        assert key in samples, f"facewatch_camera_up{{camera={camera!r}}} is not exported"
        assert samples[key] == 0
    pids = {name: s["pid"] for name, s in daemon.status()["stages"].items()}
    os.kill(daemon.proc.pid, signal.SIGHUP)
    wait_for(lambda: "SIGHUP: reloading" in daemon.log_text(), 10, "the SIGHUP handled")
    sink.frames.clear()
    sink.until(lambda: any(f.camera == "good" for f in sink.frames), 30, "frames after SIGHUP")
    assert {name: s["pid"] for name, s in daemon.status()["stages"].items()} == pids
    assert daemon.stop(10) == 0


# --- issue 13, item 3: a taken port ------------------------------------------------------------

def listener() -> tuple[object, int]:
    """Another process's socket, as far as the daemon is concerned: bound and listening."""
    import socket
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock, sock.getsockname()[1]


def run_cli(*args: str, timeout: float = 90) -> tuple[int, str, float]:
    started = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-m", "facewatch.daemon.cli", *args], cwd=REPO,
                              capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"still running after {timeout} s (restarting?):\n{exc.stdout}{exc.stderr}")
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - started


@pytest.mark.timeout(120)
def test_taken_event_port_fails_fast_naming_it(short_dir):
    sock, port = listener()
    with sock:
        endpoint = f"tcp://127.0.0.1:{port}"
        config = publish_only_config(short_dir, publish={"endpoint": endpoint})
        code, out, took = run_cli("run", "--config", str(config), timeout=60)
    assert code != 0, out
    assert f"publish.endpoint {endpoint}: address already in use" in out, out
    assert "started publish" not in out and "restart #" not in out and "Traceback" not in out
    assert took < 30, took


@pytest.mark.timeout(120)
def test_publish_stage_on_a_taken_port_exits_78(short_dir):
    """The stage itself (its port taken after the supervisor's check, e.g. on a restart):
    exit 78, so the supervisor stops instead of restarting it."""
    from facewatch.stages.errors import EXIT_SETUP

    sock, port = listener()
    with sock:
        endpoint = f"tcp://127.0.0.1:{port}"
        config = publish_only_config(short_dir, publish={"endpoint": endpoint})
        proc = subprocess.run([sys.executable, "-m", "facewatch.daemon.worker", "--stage", "publish",
                               "--config", str(config)], cwd=REPO, capture_output=True, text=True,
                              timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == EXIT_SETUP, proc.stderr
    assert f"publish.endpoint {endpoint} is already in use by another process" in proc.stderr


@pytest.mark.timeout(60)
def test_taken_metrics_port_fails_fast_naming_it(short_dir):
    sock, port = listener()
    with sock:
        config = publish_only_config(short_dir, metrics={"port": port})
        code, out, took = run_cli("run", "--config", str(config), timeout=40)
    assert code != 0 and f"metrics.port {port} on 127.0.0.1: Address already in use" in out, out
    assert "started publish" not in out and took < 30


@pytest.mark.parametrize("sections, key, needle", [
    ({"publish": {"endpoint": "tcp://127.0.0.1:9200"}, "metrics": {"port": 9200}},
     "metrics.port", "port 9200 is also used by publish.endpoint tcp://127.0.0.1:9200"),
    ({"publish": {"endpoint": "tcp://127.0.0.1:5582"}, "runtime": {"transport": "tcp"}},
     "runtime.base_port", "port 5582 is also used by publish.endpoint"),
    ({"metrics": {"host": "0.0.0.0", "port": 5580}, "runtime": {"transport": "tcp"}},
     "runtime.base_port", "port 5580 is also used by metrics.port 5580"),
])
def test_validate_config_refuses_port_clashes(sections, key, needle, tmp_path):
    from conftest import write_config

    config = write_config(tmp_path / "config.yaml", [{"name": "c", "uri": "/dev/video0"}],
                          **sections)
    code, out, _ = run_cli("validate-config", str(config), timeout=60)
    assert code != 0, out
    assert f"{key} (line " in out and needle in out, out


# --- issue 13, item 5: event identity survives stage restarts ---------------------------------

def last_logged(path: Path, track_id: int):
    return lambda: (lines := log_lines(path)) and lines[-1]["track_id"] == track_id and lines


@pytest.mark.timeout(180)
def test_seq_strictly_increases_across_publish_restarts(short_dir, daemons, subscribers):
    """publish SIGKILLed twice: every event of the run, in the log and at the subscriber, has
    a larger seq than the one before it, and the same run_id."""
    config = publish_only_config(short_dir)
    cfg = yaml.safe_load(config.read_text())
    log_path = Path(cfg["publish"]["event_log"])
    daemon = daemons(config, short_dir / "run")
    daemon.wait_ready(90)
    sub = subscribers(cfg["publish"]["endpoint"])
    feed = DecisionFeed(short_dir / "run")
    try:
        connect(feed, sub)
        for kill in range(1, 3):
            for _ in range(10):
                assert feed.send()
            wait_for(last_logged(log_path, feed.sent), 20, "the events logged")
            old = daemon.stage("publish")["pid"]
            os.kill(old, signal.SIGKILL)
            wait_for(lambda: daemon.stage("publish").get("restarts") == kill and
                     daemon.stage("publish").get("ready") and
                     daemon.stage("publish").get("pid") != old, 60, "publish restarted")
        wait_for(lambda: feed.send() and last_logged(log_path, feed.sent)(), 30,
                 "events after the last restart")
        logged = log_lines(log_path)
        seqs = [e["seq"] for e in logged]
        assert all(b > a for a, b in zip(seqs, seqs[1:])), f"seq went back: {seqs}"
        assert len({e["run_id"] for e in logged}) == 1
        got = [e["seq"] for e in sub.events]
        assert all(b > a for a, b in zip(got, got[1:])), f"the subscriber saw seq go back: {got}"
        assert daemon.stage("publish")["restarts"] == 2
        assert daemon.stop(10) == 0
    finally:
        feed.close()


@pytest.mark.timeout(300)
def test_track_ids_are_never_reused_across_detect_restarts(models, short_video, short_dir,
                                                          daemons):
    """Only detect runs in the daemon; the test is its capture (PUSHes the frames of a face
    video) and its embed stage (binds the faces socket). detect is SIGKILLed between two passes
    of the video: the second pass's tracks get new ids, never the first pass's."""
    import cv2
    from conftest import write_config
    from facewatch.stages.messages import FaceCrops, VideoFrame

    run = short_dir / "run"
    config = write_config(short_dir / "config.yaml", [{"name": "door",
                                                       "uri": "rtsp://127.0.0.1:9/unused"}],
                          runtime={"dir": str(run)}, supervisor={"stages": ["detect"]},
                          detect={"track_buffer": 5, "batch_max": 4})
    cap = cv2.VideoCapture(str(short_video.path))
    images = []
    while (frame := cap.read()[1]) is not None:
        images.append(frame)
    transport = Transport()
    endpoints = Endpoints.for_runtime("ipc", run)
    faces = transport.receiver(endpoints.faces)
    frames = transport.sender(endpoints.frames, "capture:door")
    daemon = daemons(config, run)
    try:
        daemon.wait_ready(120)
        index = iter(range(10**6))

        def one_pass() -> set[int]:
            """The video once (tracks end in the blank frames after it); the ids detect sent."""
            pid = daemon.stage("detect")["pid"]
            for image in images + [np.full_like(images[0], 96)] * 8:
                # paced like the live camera it stands for: detect keeps only the newest frame
                # of a live camera, so a burst would be detected as its last (blank) frames
                time.sleep(1 / 25)
                i = next(index)
                assert frames.send(VideoFrame(camera="door", frame_index=i, pts=i / 25,
                                              wall_ts=time.time(), frame_width=image.shape[1],
                                              frame_height=image.shape[0], image=image), 30)
            ids: set[int] = set()
            ended: set[int] = set()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not (ids and ids <= ended):
                msg = faces.recv(0.2)
                if isinstance(msg, FaceCrops) and msg.instance == pid:
                    ids |= set(msg.track_ids.tolist())
                    ended |= set(msg.ended_tracks.tolist())
            assert ids, "no face tracked: is the detector trained?"
            return ids

        before = one_pass()
        old = daemon.stage("detect")["pid"]
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: daemon.stage("detect").get("restarts") == 1 and
                 daemon.stage("detect").get("ready") and
                 daemon.stage("detect").get("pid") != old, 120, "detect restarted")
        after = one_pass()
        print(f"track ids before the restart {sorted(before)}, after {sorted(after)}")
        assert not before & after, "a track id was reused after detect restarted"
        assert min(after) > max(before)
        assert daemon.stop(10) == 0
    finally:
        transport.close(linger_ms=0)


# --- other situations: a second daemon on the same runtime dir; a dir left by a killed one ------

@pytest.mark.timeout(180)
def test_second_daemon_on_a_runtime_dir_is_refused_and_a_killed_ones_dir_is_reused(
        short_dir, daemons, subscribers):
    config = publish_only_config(short_dir)
    cfg = yaml.safe_load(config.read_text())
    first = daemons(config, short_dir / "run")
    first.wait_ready(90)
    pids = {n: s["pid"] for n, s in first.status()["stages"].items()}
    code, out, took = run_cli("run", "--config", str(config), timeout=60)
    assert code != 0 and f"another facewatch (pid {first.proc.pid}) is running with runtime " \
                          f"directory {short_dir / 'run'}" in out, out
    assert first.proc.poll() is None
    assert {n: s["pid"] for n, s in first.status()["stages"].items()} == pids
    sub = subscribers(cfg["publish"]["endpoint"])
    feed = DecisionFeed(short_dir / "run")
    try:
        connect(feed, sub)   # the first daemon's sockets are still its own
    finally:
        feed.close()
    first.proc.kill()              # SIGKILL: the runtime dir, sockets and status stay behind
    first.proc.wait(10)
    wait_for(lambda: not any(psutil_alive(pid) for pid in pids.values()), 20,
             "the stages to follow the killed supervisor")
    assert (short_dir / "run" / "lock").exists()
    stale = json.loads((short_dir / "run" / "status.json").read_text())
    assert stale["ready"] and stale["supervisor_pid"] == first.proc.pid
    second = daemons(config, short_dir / "run")
    wait_for(lambda: second.status().get("supervisor_pid") == second.proc.pid and
             second.status().get("ready"), 90, "the second daemon ready in the reused dir")
    assert second.stop(10) == 0


def psutil_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.timeout(120)
def test_daemon_with_a_read_only_gallery_stops_naming_it(models, read_only_folder, short_dir):
    """Not a match stage restarting forever: one line naming the gallery, exit 78."""
    from facewatch.stages.errors import EXIT_SETUP
    from facewatch.stages.gallery import Gallery

    folder, make_read_only = read_only_folder
    path = folder / "gallery.db"
    Gallery(path).close()
    make_read_only()
    config = match_config(short_dir, gallery={"path": str(path)})
    code, out, took = run_cli("run", "--config", str(config), timeout=90)
    assert code == EXIT_SETUP, out[-3000:]
    assert f"gallery.path: gallery {path} is read-only" in out, out[-3000:]
    assert "restart #" not in out and "Traceback" not in out
