"""Per-camera multi-object tracking with ultralytics' ByteTrack or BoT-SORT (the trackers only).

ultralytics' trackers accept any numpy-backed object with `.conf`, `.cls`, `.xywh` (centre x,
centre y, w, h), `.xyxy`, `__len__` and boolean-mask `__getitem__`, and return rows
`[x1, y1, x2, y2, track_id, score, cls, idx]` where idx is the detection's index. We keep the
detector's own box for each track (via idx) because it is what the crop must use.

A track has *ended* when the tracker no longer holds it as tracked or lost (it was removed
after `track_buffer` frames without a match); `CameraTracker.update` reports those ids.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from stages.detections import Detections

TRACKER_OVERRIDES = ("track_buffer", "track_high_thresh", "track_low_thresh", "new_track_thresh",
                     "match_thresh")


def configure_ultralytics_offline(config_dir: Path | None = None) -> None:
    """Before the first `import ultralytics`: no DNS probe, no pip installs, a writable settings
    dir (the service's home is not writable). The daemon-side twin of
    training.ultralytics_env.configure_offline, without the font the trainer needs."""
    if "YOLO_CONFIG_DIR" not in os.environ:
        config_dir = config_dir or Path(tempfile.gettempdir()) / f"facewatch-ultralytics-{os.getuid()}"
        config_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.environ["YOLO_CONFIG_DIR"] = str(config_dir)
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ["YOLO_AUTOINSTALL"] = "0"
    os.environ.setdefault("YOLO_VERBOSE", "False")


class TrackerInput:
    """Detections in the shape ultralytics' trackers read (numpy only, no torch)."""

    def __init__(self, xyxy: np.ndarray, conf: np.ndarray):
        self.xyxy = np.asarray(xyxy, np.float32).reshape(-1, 4)
        self.conf = np.asarray(conf, np.float32).reshape(-1)
        self.cls = np.zeros(len(self.conf), np.float32)

    @property
    def xywh(self) -> np.ndarray:
        x1, y1, x2, y2 = self.xyxy.T
        return np.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], axis=1)

    def __len__(self) -> int:
        return len(self.conf)

    def __getitem__(self, index) -> "TrackerInput":
        return TrackerInput(self.xyxy[index], self.conf[index])


@dataclass(frozen=True)
class Tracks:
    """The tracked faces of one frame: parallel arrays, boxes are the detector's boxes."""
    track_ids: np.ndarray   # (K,) int64
    boxes: np.ndarray       # (K, 4) float32
    scores: np.ndarray      # (K,) float32
    ended: list[int]        # tracks that ended at this frame
    landmarks: np.ndarray | None = None  # (K, 5, 2) float32, the detector's, when it has them

    def __len__(self) -> int:
        return len(self.track_ids)


def tracker_args(kind: str, detect_cfg) -> object:
    """ultralytics' own defaults file for the tracker, with our configured overrides."""
    configure_ultralytics_offline()
    import ultralytics
    from ultralytics.utils import IterableSimpleNamespace

    path = Path(ultralytics.__file__).parent / "cfg" / "trackers" / f"{kind}.yaml"
    args = yaml.safe_load(path.read_text())
    for key in TRACKER_OVERRIDES:
        args[key] = getattr(detect_cfg, key)
    if kind == "botsort":
        args["with_reid"] = False   # appearance comes from our own embedder, later in the pipeline
        args["gmc_method"] = "none"  # fixed cameras: camera-motion compensation is wasted CPU
    return IterableSimpleNamespace(**args)


class CameraTracker:
    """One camera's tracker, and the bookkeeping that turns removals into 'ended' reports."""

    def __init__(self, kind: str, args):
        configure_ultralytics_offline()
        if kind == "bytetrack":
            from ultralytics.trackers.byte_tracker import BYTETracker as cls
        elif kind == "botsort":
            from ultralytics.trackers.bot_sort import BOTSORT as cls
        else:
            raise ValueError(f"tracker must be 'bytetrack' or 'botsort', got {kind!r}")
        self.tracker = cls(args)
        self.active: set[int] = set()   # ids reported downstream and not yet ended

    def update(self, detections: Detections, image: np.ndarray | None) -> Tracks:
        rows = self.tracker.update(TrackerInput(detections.boxes, detections.scores), image)
        rows = np.asarray(rows, np.float32).reshape(-1, 8)
        idx = rows[:, 7].astype(np.int64)
        ids = rows[:, 4].astype(np.int64)
        alive = {int(t.track_id) for t in self.tracker.tracked_stracks + self.tracker.lost_stracks}
        ended = sorted(self.active - alive)
        self.active = (self.active - set(ended)) | {int(i) for i in ids}
        landmarks = None if detections.landmarks is None else detections.landmarks[idx]
        return Tracks(ids, detections.boxes[idx].astype(np.float32),
                      detections.scores[idx].astype(np.float32), ended, landmarks)

    def end_all(self) -> list[int]:
        """The stream ended: every active track ends; the tracker starts afresh."""
        ended = sorted(self.active)
        self.active.clear()
        self.tracker.reset()
        return ended
