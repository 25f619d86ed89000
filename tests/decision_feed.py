"""The test as the match stage of another host: the real daemon runs only its publish stage
(`supervisor.stages: [publish]`) and the test PUSHes real TrackDecision messages into its
decisions socket. Events, the event log, CURVE and back-pressure can then be tested with the
real supervisor and publish process, without the models."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from conftest import write_config
from facewatch.stages.messages import TrackDecision
from facewatch.stages.transport import Endpoints, Transport

PLACEHOLDER_CAMERA = {"name": "door", "uri": "rtsp://127.0.0.1:9/unused"}   # captured elsewhere


def publish_only_config(short_dir: Path, cameras: list[dict] | None = None, stages=("publish",),
                        **sections) -> Path:
    supervisor = {"stages": list(stages), **sections.pop("supervisor", {})}
    return write_config(short_dir / "config.yaml", cameras or [PLACEHOLDER_CAMERA],
                        runtime={"dir": str(short_dir / "run")}, supervisor=supervisor,
                        **sections)


def decision(camera: str = "door", track_id: int = 1, snapshot_px: int = 0,
             rng: np.random.Generator | None = None) -> TrackDecision:
    snap = np.zeros((0, 0, 0, 3), np.uint8)
    if snapshot_px:   # noise: the JPEG in the event stays large
        rng = rng or np.random.default_rng(track_id)
        snap = rng.integers(0, 255, (1, snapshot_px, snapshot_px, 3), np.uint8)
    return TrackDecision(camera=camera, type="unknown", track_id=track_id, name=None,
                         person_id=None, similarity=0.31, threshold=0.5, votes=3,
                         bbox=[10.0, 20.0, 110.0, 140.0], frame_pts=0.04 * track_id,
                         capture_ts=time.time(), snapshot=snap)


class DecisionFeed:
    """PUSH TrackDecisions to the daemon's publish stage over its real ipc socket."""

    def __init__(self, runtime_dir: Path):
        self.transport = Transport()
        self.sender = self.transport.sender(Endpoints.for_runtime("ipc", runtime_dir).decisions,
                                            "match")
        self.sent = 0

    def send(self, msg: TrackDecision | None = None, timeout_s: float = 5.0) -> bool:
        ok = self.sender.send(msg or decision(track_id=self.sent + 1), timeout_s=timeout_s)
        self.sent += ok
        return ok

    def close(self) -> None:
        self.transport.close(linger_ms=0)
