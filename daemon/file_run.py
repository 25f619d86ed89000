"""The real daemon on one video file, as a child process: the mechanics shared by `facewatch demo`
and `facewatch evaluate-oneshot`.

`load_models` opens the detector and embedder the way enrollment uses them, `file_config` writes
the programmatic config (one non-looping file camera, free local ports, an event log) and
`run_daemon` runs `facewatch run` on it until the file ends (the daemon then exits 0), passing
every published event to a callback through a real ZeroMQ subscriber when one is given.
"""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable

import yaml

from facewatch.training.paths import REPO_ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_models(detector: Path, embedder: Path, landmarks: Path | None = None):
    """(FaceDetector, FaceEmbedder) on the CPU, as `facewatch enroll --cpu` opens them."""
    from facewatch.stages.face_detector import FaceDetector
    from facewatch.stages.face_embedder import FaceEmbedder
    from facewatch.stages.face_landmarks import landmarks_to_run

    cpu = ["CPUExecutionProvider"]
    face_embedder = FaceEmbedder(embedder, providers=cpu)
    return (FaceDetector(detector, providers=cpu,
                         landmarks=landmarks_to_run(face_embedder.crop_spec.alignment, landmarks)),
            face_embedder)


def file_config(video: Path, camera: str, detector: Path, embedder: Path, gallery: Path,
                event_log: Path, realtime: bool | None = None,
                models_extra: dict | None = None, landmarks: Path | None = None) -> dict:
    """Config for one video file that does not loop; `realtime` None keeps the schema's default."""
    cam = {"name": camera, "uri": str(video), "loop": False}
    if realtime is not None:
        cam["realtime"] = realtime
    return {"cameras": [cam],
            "models": {"detector": str(detector), "embedder": str(embedder),
                       "landmarks": None if landmarks is None else str(landmarks),
                       **(models_extra or {})},
            "gallery": {"path": str(gallery)},
            "publish": {"endpoint": f"tcp://127.0.0.1:{free_port()}", "event_log": str(event_log)},
            "metrics": {"port": free_port()}}


def _subscribe(endpoint: str, stop: threading.Event, on_event: Callable[[dict], None]) -> None:
    import zmq

    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.RCVTIMEO, 200)
    sub.connect(endpoint)
    while not stop.is_set():
        try:
            event = json.loads(sub.recv_multipart()[-1])
        except zmq.Again:
            continue
        on_event(event)
    sub.close(linger=0)


def run_daemon(config: dict, config_path: Path, timeout: float,
               on_event: Callable[[dict], None] | None = None, log_path: Path | None = None) -> int:
    """Write `config` to `config_path` (a previous event log is removed), run the daemon on it and
    return its exit status. SIGTERM after `timeout` seconds (or on Ctrl-C): an orderly drain.
    The daemon's own log goes to `log_path` when given, else to this process's stderr."""
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    Path(config["publish"]["event_log"]).unlink(missing_ok=True)
    stop = threading.Event()
    listener = None
    if on_event is not None:   # connected before the daemon starts, so no event is missed
        listener = threading.Thread(target=_subscribe, daemon=True,
                                    args=(config["publish"]["endpoint"], stop, on_event))
        listener.start()
    log_file = open(log_path, "wb") if log_path is not None else None
    try:
        daemon = subprocess.Popen([sys.executable, "-m", "facewatch.daemon.cli", "run", "--config",
                                   str(config_path)], cwd=REPO_ROOT, stderr=log_file)
        try:
            code = daemon.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            daemon.send_signal(signal.SIGTERM)
            code = daemon.wait(timeout=15)
        except KeyboardInterrupt:
            daemon.send_signal(signal.SIGINT)
            code = daemon.wait(timeout=15)
    finally:
        if log_file is not None:
            log_file.close()
        stop.set()
        if listener is not None:
            listener.join(timeout=2)
    return code
