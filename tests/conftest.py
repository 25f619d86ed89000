"""Shared test fixtures: real data, a real video made from it, ports, configs, polling helpers.

Data-dependent fixtures skip with a reason when ../shared/data (or $FACEWATCH_DATA) is absent;
model-dependent ones skip while models/*.onnx have not been trained yet.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# TensorFlow (embedder tests, imported at collection) and torch (ultralytics) share this process.
# torch's triton segfaults when imported after TensorFlow (tensorflow-cpu 2.21, torch 2.14);
# the other order works, so torch's heavy half is loaded first.
try:
    import torchvision.ops  # noqa: F401  (imports torch._dynamo and triton)
except ImportError:
    pass
import cv2
import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from facewatch.training.paths import shared_data_dir  # noqa: E402

# $FACEWATCH_MODELS points the tests at models kept elsewhere (e.g. a GPU host's model store)
MODELS_DIR = Path(os.environ.get("FACEWATCH_MODELS", REPO / "models"))
DETECTOR = MODELS_DIR / "face_detector.onnx"
EMBEDDER = MODELS_DIR / "face_embedder.onnx"


# --- polling, never sleep-and-hope -------------------------------------------------------

def landmark_alignment(path: Path) -> str:
    """The crop alignment a landmark model file serves, from its `landmark_layout` (the shipped
    one follows the shipped embedder: dlib's five points or ArcFace's)."""
    from facewatch.stages.face_crop import LANDMARK_LAYOUTS
    from facewatch.stages.face_landmarks import LandmarkModel

    layout = LandmarkModel(path, ["CPUExecutionProvider"]).layout
    return {v: k for k, v in LANDMARK_LAYOUTS.items()}[layout]


def wait_for(condition, timeout: float, what: str, interval: float = 0.05):
    """Poll `condition()` until it returns something truthy; fail naming `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def short_dir():
    """A runtime dir with a short path: ipc:// socket paths are limited to 107 characters and
    pytest's tmp paths can be longer."""
    path = Path(tempfile.mkdtemp(prefix="fw-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def int8_speed_cache(tmp_path_factory):
    """models.precision auto's timings (stages.int8_probe) go to a folder of the test session,
    shared by its daemons, never to the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("cache")
        mp.setenv("FACEWATCH_CACHE_DIR", str(path))
        yield path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A fresh runs/ folder (FACEWATCH_RUNS) for one test module's training runs and caches."""
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("runs")
        mp.setenv("FACEWATCH_RUNS", str(path))
        yield path


# --- data --------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = shared_data_dir()
    if not d.is_dir():
        pytest.skip(f"shared data not found at {d} (set FACEWATCH_DATA)")
    return d


@pytest.fixture(scope="session")
def wider_val_images(data_dir) -> list[Path]:
    """The first 12 images of our WIDER validation split (detector comparison tests)."""
    from facewatch.training.widerface import load_split

    root = data_dir / "widerface" / "images"
    return [root / rel for rel in load_split()["val"][:12]]


@pytest.fixture(scope="session")
def knn_dir(data_dir) -> Path:
    d = data_dir / "faces_small" / "knn_examples"
    if not (d / "train").is_dir() or not (d / "test").is_dir():
        pytest.skip(f"faces_small/knn_examples not found under {data_dir}")
    return d


@dataclass
class FaceVideo:
    path: Path
    fps: float
    frames: int
    size: tuple[int, int]                                  # (width, height)
    segments: list[dict] = field(default_factory=list)     # photo, names, first/last frame


# Test photos and who is in them (the train/ folder names).
TEST_PHOTOS = {
    "obama1.jpg": ["obama"],
    "alex_lacamoire1.jpg": ["alex_lacamoire"],
    "johnsnow_test1.jpg": ["kit_harington"],
    "kit_with_rose.jpg": ["kit_harington", "rose_leslie"],
    "obama_and_biden.jpg": ["biden", "obama"],
}


def make_face_video(path: Path, photos: list[Path], size=(640, 480), fps: float = 25.0,
                    seconds_each: float = 1.6, gap_frames: int = 8) -> FaceVideo:
    """An mp4 of the photos, one after another, each drifting slowly (so trackers have motion),
    separated by blank frames (so tracks end between photos)."""
    w, h = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    if not writer.isOpened():
        raise RuntimeError(f"cv2.VideoWriter cannot write {path}")
    video = FaceVideo(path, fps, 0, size)
    blank = np.full((h, w, 3), 96, np.uint8)
    per = max(1, round(seconds_each * fps))
    for photo in photos:
        img = cv2.imread(str(photo))
        scale = min((w - 60) / img.shape[1], (h - 40) / img.shape[0])
        img = cv2.resize(img, (round(img.shape[1] * scale), round(img.shape[0] * scale)),
                         interpolation=cv2.INTER_AREA)
        first = video.frames
        for i in range(per):
            frame = blank.copy()
            dx = int(20 * math.sin(2 * math.pi * i / per))   # slow horizontal drift
            x = (w - img.shape[1]) // 2 + dx
            y = (h - img.shape[0]) // 2
            frame[y:y + img.shape[0], x:x + img.shape[1]] = img
            writer.write(frame)
            video.frames += 1
        video.segments.append({"photo": photo.name, "names": TEST_PHOTOS.get(photo.name, []),
                               "first": first, "last": video.frames - 1})
        for _ in range(gap_frames):
            writer.write(blank)
            video.frames += 1
    writer.release()
    return video


@pytest.fixture(scope="session")
def face_video(knn_dir, tmp_path_factory) -> FaceVideo:
    """All test photos, ~10 s at 25 fps."""
    path = tmp_path_factory.mktemp("video") / "faces.mp4"
    return make_face_video(path, [knn_dir / "test" / p for p in TEST_PHOTOS])


@pytest.fixture(scope="session")
def short_video(knn_dir, tmp_path_factory) -> FaceVideo:
    """One photo, 1 s at 25 fps: for capture tests that loop or pace in real time."""
    path = tmp_path_factory.mktemp("video") / "short.mp4"
    return make_face_video(path, [knn_dir / "test" / "obama1.jpg"], size=(320, 240),
                           seconds_each=1.0, gap_frames=0)


# --- models and gallery ------------------------------------------------------------------

@pytest.fixture(scope="session")
def models() -> tuple[Path, Path]:
    missing = [str(p) for p in (DETECTOR, EMBEDDER) if not p.is_file()]
    if missing:
        pytest.skip(f"trained models not present yet: {', '.join(missing)} "
                    f"(train and export them with `facewatch train-detector/-embedder`)")
    return DETECTOR, EMBEDDER


@pytest.fixture(scope="session")
def gallery_module():
    try:
        import facewatch.stages.gallery as gallery
    except ImportError as exc:
        pytest.skip(f"stages.gallery not available yet: {exc}")
    return gallery


# --- configs -----------------------------------------------------------------------------

def write_config(path: Path, cameras: list[dict], **sections) -> Path:
    """A config.yaml with test-friendly defaults (free ports, fast restarts) and overrides."""
    cfg = {
        "cameras": cameras,
        "models": {"detector": str(DETECTOR), "embedder": str(EMBEDDER),
                   "landmarks": str(MODELS_DIR / "face_landmarks.onnx"),
                   "providers": ["CPUExecutionProvider"], "threads": 1},
        "publish": {"endpoint": f"tcp://127.0.0.1:{free_port()}",
                    "event_log": str(path.parent / "events.jsonl")},
        "metrics": {"host": "127.0.0.1", "port": free_port()},
        "gallery": {"path": str(path.parent / "gallery.db"), "poll_interval_s": 0.2},
        "supervisor": {"restart_initial_s": 0.2, "restart_max_s": 2.0, "heartbeat_s": 0.5,
                       "shutdown_timeout_s": 7.0},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            cfg.setdefault(key, {}).update(value)
        else:
            cfg[key] = value
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- the real daemon as a subprocess -------------------------------------------------------

class Daemon:
    """`facewatch run` in a subprocess, its log in a file, its status.json readable."""

    def __init__(self, config: Path, runtime_dir: Path, args: list[str] = (), env: dict | None = None):
        self.runtime_dir = runtime_dir
        self.log_path = runtime_dir.parent / f"{runtime_dir.name}-daemon.log"
        self._log = open(self.log_path, "wb")
        full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "facewatch.daemon.cli", "run", "--config", str(config), *args],
            cwd=REPO, env=full_env, stdout=self._log, stderr=subprocess.STDOUT)

    def status(self) -> dict:
        try:
            return json.loads((self.runtime_dir / "status.json").read_text())
        except (OSError, ValueError):
            return {}

    def stage(self, name: str) -> dict:
        return self.status().get("stages", {}).get(name, {})

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 90) -> dict:
        def ready():
            if self.proc.poll() is not None:
                pytest.fail(f"daemon exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            return self.status() if self.status().get("ready") else None
        return wait_for(ready, timeout, "the daemon to report every stage ready")

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"daemon still running after {timeout} s:\n{self.log_text()[-3000:]}")

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait; the daemon promises to exit 0 within 10 s."""
        self.proc.send_signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for pid in [s.get("pid") for s in self.status().get("stages", {}).values()]:
            if pid:   # a stage left behind by a failed test: ours, by pid
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        self._log.close()


@pytest.fixture
def daemons():
    started: list[Daemon] = []
    yield lambda *a, **kw: started.append(Daemon(*a, **kw)) or started[-1]
    for d in started:
        d.close()
