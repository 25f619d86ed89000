"""Tracking quality on the shared clip: supervision's ByteTrack (the daemon's, stages.tracking)
against ultralytics' ByteTrack (the daemon's tracker before, training extras only now).

    python -m bench.bench_tracker [--video CLIP] [--strides 1 3]

Both trackers get the same detections (the shipped detector, run once per frame) with the same
settings (the config's `detect` section). The clip has no ground truth, so each detection's
identity comes from the embedder: detections are clustered greedily by cosine similarity (at the
embedder's pair-accuracy threshold), and two detections of one frame are never put in the same
cluster. Against those identities, per tracker:

- id_switches: within one track, the identity changes from one tracked frame to the next;
- fragments: for each identity, the number of tracks it was split into, minus one;
- impure: detections whose identity is not their track's majority identity;
- tracks, coverage (tracked detections / detections at or above track_low_thresh).

Stride 1 is the clip at 25 frames/s; stride 3 keeps every third frame (~8 frames/s, what a
camera with `fps_cap: 10` gives the tracker). Prints one JSON object; ratios are new / old.
"""
from __future__ import annotations

import argparse
import collections
import time
from pathlib import Path

import numpy as np

from bench.common import (add_daemon_arguments, bench_config, clip_path, emit, environment, log,
                          model_paths, read_frames)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_daemon_arguments(p)
    p.add_argument("--strides", type=int, nargs="+", default=[1, 3],
                   help="keep every Nth frame of the clip (1: all, 25 frames/s)")
    p.add_argument("--cluster-threshold", type=float, default=None,
                   help="cosine similarity joining a detection to an identity (default: the "
                        "embedder's pair-accuracy threshold)")


class UltralyticsByteTrack:
    """The daemon's tracker before: ultralytics' BYTETracker with its bytetrack.yaml and the
    config's overrides (needs the training extras: ultralytics, torch)."""

    def __init__(self, dcfg):
        from facewatch.training.ultralytics_env import configure_offline

        configure_offline()
        import ultralytics
        import yaml
        from ultralytics.trackers.byte_tracker import BYTETracker
        from ultralytics.utils import IterableSimpleNamespace

        path = Path(ultralytics.__file__).parent / "cfg" / "trackers" / "bytetrack.yaml"
        args = yaml.safe_load(path.read_text())
        for key in ("track_buffer", "track_high_thresh", "track_low_thresh", "new_track_thresh",
                    "match_thresh"):
            args[key] = getattr(dcfg, key)
        self.tracker = BYTETracker(IterableSimpleNamespace(**args))

    def update(self, boxes: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """-> (detection index, track id) of the tracked detections."""
        class Input:   # the shape ultralytics' trackers read (numpy only)
            def __init__(self, xyxy, conf):
                self.xyxy, self.conf = xyxy, conf
                self.cls = np.zeros(len(conf), np.float32)

            @property
            def xywh(self):
                x1, y1, x2, y2 = self.xyxy.T
                return np.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], axis=1)

            def __len__(self):
                return len(self.conf)

            def __getitem__(self, i):
                return Input(self.xyxy[i], self.conf[i])

        rows = np.asarray(self.tracker.update(Input(boxes, scores), None), np.float32).reshape(-1, 8)
        return rows[:, 7].astype(np.int64), rows[:, 4].astype(np.int64)


class SupervisionByteTrack:
    """The daemon's tracker now (stages.tracking.CameraTracker)."""

    def __init__(self, dcfg):
        from facewatch.stages.tracking import CameraTracker, tracker_args

        self.tracker = CameraTracker("bytetrack", tracker_args("bytetrack", dcfg))

    def update(self, boxes: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from facewatch.stages.detections import Detections

        tracks = self.tracker.update(Detections(boxes, scores), None)
        # the detector's boxes come back unchanged: find each one's index
        idx = np.array([int(np.flatnonzero((boxes == b).all(axis=1))[0]) for b in tracks.boxes],
                       np.int64)
        return idx, tracks.track_ids


def identities(embeddings: np.ndarray, frame_of: np.ndarray, threshold: float) -> np.ndarray:
    """Greedy clustering (most confident first is the caller's order): each detection joins the
    most similar identity (mean embedding) at >= threshold that has nobody in its frame yet."""
    means: list[np.ndarray] = []
    counts: list[int] = []
    frames: list[set] = []
    out = np.full(len(embeddings), -1, np.int64)
    for i, e in enumerate(embeddings):
        best, best_sim = -1, threshold
        for k, m in enumerate(means):
            if frame_of[i] in frames[k]:
                continue
            sim = float(e @ (m / np.linalg.norm(m)))
            if sim >= best_sim:
                best, best_sim = k, sim
        if best < 0:
            means.append(e.copy())
            counts.append(1)
            frames.append({frame_of[i]})
            best = len(means) - 1
        else:
            means[best] += e
            counts[best] += 1
            frames[best].add(frame_of[i])
        out[i] = best
    return out


def score(track_of: np.ndarray, ident: np.ndarray, frame_of: np.ndarray, eligible: np.ndarray) -> dict:
    tracked = track_of >= 0
    by_track: dict[int, list[tuple[int, int]]] = collections.defaultdict(list)
    for i in np.flatnonzero(tracked):
        by_track[int(track_of[i])].append((int(frame_of[i]), int(ident[i])))
    switches = impure = 0
    for items in by_track.values():
        items.sort()
        ids = [k for _, k in items]
        switches += sum(a != b for a, b in zip(ids, ids[1:]))
        impure += len(ids) - collections.Counter(ids).most_common(1)[0][1]
    tracks_of_ident: dict[int, set] = collections.defaultdict(set)
    for i in np.flatnonzero(tracked):
        tracks_of_ident[int(ident[i])].add(int(track_of[i]))
    return {"tracks": len(by_track), "id_switches": switches,
            "fragments": sum(len(t) - 1 for t in tracks_of_ident.values()), "impure": impure,
            "tracked_detections": int(tracked.sum()),
            "coverage": round(float(tracked.sum()) / max(int(eligible.sum()), 1), 4)}


def run(args: argparse.Namespace) -> dict:
    from facewatch.stages.embed_stage import read_embedder_info
    from facewatch.stages.face_crop import crop_faces
    from facewatch.stages.face_detector import detector_from_config
    from facewatch.stages.face_embedder import FaceEmbedder
    from facewatch.stages.face_landmarks import landmark_model_from_config

    detector_path, embedder_path = model_paths(args.models)
    cfg = bench_config(args, detector_path, embedder_path)
    video = clip_path(args.video)
    frames = read_frames(video)
    log(f"{len(frames)} frames of {video}")
    detector = detector_from_config(cfg.models)
    info = read_embedder_info(embedder_path)
    spec = info.crop_spec()
    landmarks = landmark_model_from_config(cfg.models, spec.alignment)
    embedder = FaceEmbedder(embedder_path, providers=tuple(args.providers))
    t0 = time.perf_counter()
    dets = [detector.detect([f])[0] for f in frames]
    boxes, scores, frame_of, crops = [], [], [], []
    for i, (f, d) in enumerate(zip(frames, dets)):
        if len(d) == 0:
            continue
        lm = landmarks.predict(f, d.boxes) if landmarks is not None else d.landmarks
        crops.append(crop_faces(f, d.boxes, spec, lm)[0])
        boxes.append(d.boxes)
        scores.append(d.scores)
        frame_of += [i] * len(d)
    emb = embedder.embed(np.concatenate(crops))
    scores_all = np.concatenate(scores)
    frame_of = np.asarray(frame_of)
    order = np.argsort(-scores_all, kind="stable")
    threshold = args.cluster_threshold or info.pair_accuracy_threshold or info.threshold
    ident = np.empty(len(order), np.int64)
    ident[order] = identities(emb[order], frame_of[order], threshold)
    log(f"{len(scores_all)} detections, {len(set(ident.tolist()))} identities at cosine "
        f">= {threshold:.3f} ({time.perf_counter() - t0:.1f} s)")
    starts = np.cumsum([0] + [len(d) for d in dets])
    dcfg = cfg.detect
    result = {"benchmark": "tracker", "video": video.name, "frames": len(frames),
              "detections": int(len(scores_all)), "identities": int(len(set(ident.tolist()))),
              "cluster_threshold": round(float(threshold), 4),
              "settings": {k: getattr(dcfg, k) for k in ("track_buffer", "track_high_thresh",
                                                         "track_low_thresh", "new_track_thresh",
                                                         "match_thresh")},
              "strides": {}, "environment": environment()}
    for stride in args.strides:
        row = {}
        for name, cls in (("ultralytics_bytetrack", UltralyticsByteTrack),
                          ("supervision_bytetrack", SupervisionByteTrack)):
            tracker = cls(dcfg)
            track_of = np.full(len(scores_all), -1, np.int64)
            used = np.zeros(len(scores_all), bool)
            seconds = 0.0
            for i in range(0, len(frames), stride):
                a, b = starts[i], starts[i + 1]
                used[a:b] = True
                t = time.perf_counter()
                idx, ids = tracker.update(dets[i].boxes, dets[i].scores)
                seconds += time.perf_counter() - t
                track_of[a + idx] = ids
            eligible = used & (scores_all >= dcfg.track_low_thresh)
            row[name] = score(np.where(used, track_of, -1), ident, frame_of, eligible) | {
                "ms_per_frame": round(1000 * seconds / len(range(0, len(frames), stride)), 3)}
        new, old = row["supervision_bytetrack"], row["ultralytics_bytetrack"]
        row["new_minus_old"] = {k: new[k] - old[k] for k in ("tracks", "id_switches", "fragments",
                                                             "impure", "tracked_detections")}
        result["strides"][str(stride)] = row
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    emit(run(p.parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
