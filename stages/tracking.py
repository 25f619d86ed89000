"""Per-camera multi-object tracking with supervision's ByteTrack (numpy and scipy only).

The daemon used to take ByteTrack from ultralytics, which pulls torch into the runtime; the
same algorithm comes from `supervision` (0.30.x, whose install no longer requires
`opencv-python`, so it sits beside `opencv-python-headless`). `bench/bench_tracker.py` compares
the two on the shared clip (ID switches and fragments against identities from the embedder).

supervision's tracker returns the detections it could assign to a track, in their original
order, with `tracker_id` set; we keep each detection's index in `data` so the detector's own box
(and landmarks) go with the track: the crop must use the detector's box.

A track has *ended* when the tracker no longer holds it as tracked or lost (it was removed
after `track_buffer` frames without a match); `CameraTracker.update` reports those ids.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from facewatch.stages.detections import Detections

TRACKERS = ("bytetrack",)
FRAME_RATE = 30   # supervision keeps a lost track int(frame_rate / 30 * lost_track_buffer) frames


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


@dataclass(frozen=True)
class TrackerArgs:
    """The config's tracker settings (daemon.config.DetectConfig), validated once."""
    track_buffer: int = 30          # frames a lost track is kept
    track_high_thresh: float = 0.4  # first association (and supervision's activation threshold)
    track_low_thresh: float = 0.25  # detections below this are not tracked at all
    new_track_thresh: float = 0.5   # a new track starts from a detection at least this confident
    match_thresh: float = 0.8       # IoU-distance gate of the first association

    def __post_init__(self):
        if self.track_buffer < 1:
            raise ValueError(f"track_buffer must be >= 1, got {self.track_buffer}")
        for name in ("track_high_thresh", "track_low_thresh", "new_track_thresh", "match_thresh"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {value}")


def tracker_args(kind: str, detect_cfg) -> TrackerArgs:
    """The tracker settings from the config's `detect` section."""
    _check_kind(kind)
    return TrackerArgs(**{k: getattr(detect_cfg, k) for k in TrackerArgs.__dataclass_fields__})


def _check_kind(kind: str) -> None:
    if kind not in TRACKERS:
        raise ValueError(f"tracker must be one of {list(TRACKERS)}, got {kind!r}")


class CameraTracker:
    """One camera's tracker, and the bookkeeping that turns removals into 'ended' reports."""

    def __init__(self, kind: str, args: TrackerArgs):
        _check_kind(kind)
        from supervision import Detections as SvDetections
        from supervision.tracker.byte_tracker.core import ByteTrack

        self._detections = SvDetections
        with warnings.catch_warnings():   # supervision announces ByteTrack's move to `trackers`
            warnings.simplefilter("ignore")   # (which requires opencv-python): pinned < 0.31
            self.tracker = ByteTrack(track_activation_threshold=args.track_high_thresh,
                                     lost_track_buffer=args.track_buffer,
                                     minimum_matching_threshold=args.match_thresh,
                                     frame_rate=FRAME_RATE, minimum_consecutive_frames=1)
        # supervision derives the new-track threshold as activation + 0.1; ours is configured
        self.tracker.det_thresh = args.new_track_thresh
        self.low_thresh = args.track_low_thresh
        self.active: set[int] = set()   # ids reported downstream and not yet ended

    def update(self, detections: Detections, image: np.ndarray | None = None) -> Tracks:
        """One frame's detections -> its tracks (`image` is unused: kept for callers)."""
        keep = np.flatnonzero(detections.scores >= self.low_thresh)
        dets = self._detections(xyxy=detections.boxes[keep].astype(np.float32).reshape(-1, 4),
                                confidence=detections.scores[keep].astype(np.float32),
                                data={"index": keep.astype(np.int64)})
        tracked = self.tracker.update_with_detections(dets)
        idx = np.asarray(tracked.data.get("index", np.zeros(0, np.int64)), np.int64)
        ids = np.asarray(tracked.tracker_id, np.int64).reshape(-1)
        alive = {int(t.external_track_id) for t in self.tracker.tracked_tracks
                 + self.tracker.lost_tracks if t.external_track_id >= 0}
        ended = sorted(self.active - alive)
        self.active = (self.active - set(ended)) | {int(i) for i in ids}
        landmarks = None if detections.landmarks is None else detections.landmarks[idx]
        return Tracks(ids, detections.boxes[idx].astype(np.float32).reshape(-1, 4),
                      detections.scores[idx].astype(np.float32), ended, landmarks)

    def end_all(self) -> list[int]:
        """The stream ended: every active track ends; the tracker starts afresh."""
        ended = sorted(self.active)
        self.active.clear()
        self.tracker.reset()
        return ended
