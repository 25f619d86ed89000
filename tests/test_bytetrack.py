"""stages.bytetrack, supervision's ByteTrack without supervision's imports (issue 13, RSS):
the same track ids as supervision's own, frame by frame (tests/test_footprint.py checks that the
detect stage's tracking loads neither supervision nor scipy.optimize)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest


def scene(seed: int, frames: int = 400):
    """Faces that walk, stop, leave and come back, missed detections, low-score detections
    (ByteTrack's second association) and false positives: (xyxy float32, scores float32)."""
    rng = np.random.default_rng(seed)
    people = [dict(pos=rng.uniform(50, 1500, 2), vel=rng.normal(0, 4, 2),
                   size=rng.uniform(40, 160), start=int(rng.integers(0, 150)),
                   stop=int(rng.integers(200, frames + 100))) for _ in range(9)]
    for f in range(frames):
        boxes, scores = [], []
        for p in people:
            p["pos"] += p["vel"] + rng.normal(0, 1.5, 2)
            if not p["start"] <= f < p["stop"] or rng.random() < 0.12:
                continue   # not there, or missed this frame
            s = p["size"] * rng.uniform(0.93, 1.07)
            x, y = p["pos"]
            boxes.append([x, y, x + s, y + s * 1.2])
            scores.append(rng.uniform(0.15, 0.4) if rng.random() < 0.2 else rng.uniform(0.4, 0.98))
        for _ in range(int(rng.integers(0, 3))):   # false positives
            x, y = rng.uniform(0, 1800, 2)
            boxes.append([x, y, x + 30, y + 30])
            scores.append(rng.uniform(0.1, 0.6))
        order = rng.permutation(len(boxes))
        yield (np.asarray(boxes, np.float32).reshape(-1, 4)[order],
               np.asarray(scores, np.float32)[order])


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_same_track_ids_as_supervision(seed):
    sv = pytest.importorskip("supervision")
    from supervision.tracker.byte_tracker.core import ByteTrack as SvByteTrack

    from facewatch.stages.bytetrack import ByteTrack

    args = dict(track_activation_threshold=0.4, lost_track_buffer=10,
                minimum_matching_threshold=0.8, frame_rate=30, minimum_consecutive_frames=1)
    ours = ByteTrack(**args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = SvByteTrack(**args)
    ours.det_thresh = theirs.det_thresh = 0.5
    seen = set()
    for frame, (boxes, scores) in enumerate(scene(seed)):
        index, ids = ours.update(boxes, scores)
        tracked = theirs.update_with_detections(sv.Detections(
            xyxy=boxes, confidence=scores, data={"index": np.arange(len(boxes))}))
        assert index.tolist() == np.asarray(tracked.data.get("index", [])).tolist(), frame
        assert ids.tolist() == np.asarray(tracked.tracker_id).tolist(), frame
        for a, b in ((ours.tracked_tracks, theirs.tracked_tracks),
                     (ours.lost_tracks, theirs.lost_tracks)):
            assert [t.external_track_id for t in a] == [t.external_track_id for t in b], frame
            for ta, tb in zip(a, b):
                np.testing.assert_allclose(ta.mean, tb.mean, rtol=1e-6, atol=1e-6)
        seen |= set(ids.tolist())
    assert len(seen) >= 9, seen   # the scene did exercise the tracker

