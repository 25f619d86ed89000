"""The baseline: a naive single-process loop over the same models with the same settings.

    python -m bench.naive_loop [--models DIR] [--video CLIP] [--seconds 20] [--quick]

Per frame, one after the other in one process: cv2 read -> FaceDetector.detect([frame]) ->
ByteTrack update (stages.tracking, the daemon's tracker) -> crop every tracked face
(stages.face_crop.crop_faces) -> FaceEmbedder.embed every face, every frame -> cosine match of
every embedding against the gallery matrix. What the daemon does differently is everything else:
processes in parallel, batching, a quality gate, and embedding only a track's voting and
re-check frames. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from bench.common import (LoopingReader, add_common_arguments, apply_quick, bench_config,
                          clip_path, emit, environment, log, model_paths, rnd, summary,
                          synthetic_embeddings)


class NaiveLoop:
    """One camera, one process, every stage inline. Settings come from a FacewatchConfig, so the
    baseline runs exactly what the daemon is configured with."""

    def __init__(self, cfg, gallery: np.ndarray | None = None):
        from facewatch.stages.embed_stage import read_embedder_info
        from facewatch.stages.face_detector import detector_from_config
        from facewatch.stages.face_embedder import embedder_from_config
        from facewatch.stages.face_landmarks import landmark_model_from_config
        from facewatch.stages.tracking import tracker_args

        m, d = cfg.models, cfg.detect
        self.cfg = cfg
        info = read_embedder_info(m.embedder)
        self.crop_spec = info.crop_spec(d.crop_size, d.crop_scale)
        self.detector = detector_from_config(m)
        self.landmark_model = landmark_model_from_config(m, self.crop_spec.alignment)
        self.embedder = embedder_from_config(m)   # the same precision as the daemon
        self._tracker_args = tracker_args(d.tracker, d)
        self.gallery = (gallery if gallery is not None else
                        np.zeros((0, self.embedder.embedding_size), np.float32))
        # as the match stage: the raw override, else the open-set point for this gallery's size
        if cfg.match.threshold is not None:
            self.threshold = cfg.match.threshold
        elif info.far_table is not None:
            from facewatch.stages.open_set import operating_point

            self.threshold = operating_point(info.far_table, cfg.match.target_far,
                                             len(self.gallery)).threshold
        else:
            self.threshold = info.threshold
        self.tracker = None
        self.reset()

    def reset(self) -> None:
        """A fresh tracker, as a restarted camera would get."""
        from facewatch.stages.tracking import CameraTracker

        self.tracker = CameraTracker(self.cfg.detect.tracker, self._tracker_args)

    def step(self, frame: np.ndarray):
        """One frame through every stage; returns the tracks and which of them were recognised
        (best cosine similarity to the gallery at or above the threshold)."""
        from facewatch.stages.face_crop import crop_faces

        dets = self.detector.detect([frame])[0]
        tracks = self.tracker.update(dets, frame)
        if len(tracks) == 0:
            return tracks, np.zeros(0, bool)
        landmarks = (tracks.landmarks if self.landmark_model is None
                     else self.landmark_model.predict(frame, tracks.boxes))
        emb = self.embedder.embed(crop_faces(frame, tracks.boxes, self.crop_spec, landmarks)[0])
        if len(self.gallery) == 0:
            return tracks, np.zeros(len(tracks), bool)
        return tracks, (emb @ self.gallery.T).max(axis=1) >= self.threshold

    def run(self, video: Path, seconds: float, warmup: float = 0.0) -> dict:
        """Read the file (looping) and process every frame: `warmup` seconds untimed, then a
        `seconds` window. Per-frame latency is read-to-match time (there is no queue)."""
        reader = LoopingReader(video)
        self.reset()
        try:
            end = time.monotonic() + warmup
            while True:
                self.step(reader.read())
                if time.monotonic() >= end:
                    break
            frames = faces = recognised = 0
            latencies = []
            start = time.monotonic()
            end = start + seconds
            while True:
                t0 = time.perf_counter()
                frame = reader.read()
                tracks, known = self.step(frame)
                latencies.append((time.perf_counter() - t0) * 1000)
                frames += 1
                faces += len(tracks)
                recognised += int(known.sum())
                now = time.monotonic()
                if now >= end:
                    break
            elapsed = now - start
        finally:
            reader.close()
        return {"seconds": round(elapsed, 2), "frames": frames, "fps": round(frames / elapsed, 3),
                "faces_embedded_per_frame": rnd(faces / frames, 3),
                "recognised_per_frame": rnd(recognised / frames, 3),
                "latency_ms": summary(latencies)}

    def run_realtime(self, video: Path, seconds: float, warmup: float = 0.0) -> dict:
        """The file played like a camera at its frame rate: the loop always takes the newest
        frame (the ones it was too slow for are skipped, counted as dropped) and its "event" for
        a face is the first frame on which it tracked, embedded and matched it (no voting).
        Returns frames/s, drops and pseudo-events shaped like the daemon's (ts: when that frame
        was done; capture_ts: when the frame became due; frame_pts) for the first frame of every
        track of the window."""
        import cv2

        cap = cv2.VideoCapture(str(video))
        fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
        self.reset()
        self.step(np.zeros((int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)),
                            int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), 3), np.uint8))   # warm
        self.reset()
        seen: set[int] = set()
        events, read = [], -1
        processed = dropped = 0
        start = time.time() + 0.05              # wall time of frame 0 (pts 0)
        t0, t1 = start + warmup, start + warmup + seconds
        while True:
            now = time.time()
            if now >= t1:
                break
            due = int((now - start) * fps)      # the newest frame a camera would have sent
            if due <= read:
                time.sleep(max(0.0, start + (read + 1) / fps - now))
                continue
            skipped = due - read - 1
            while read < due:                   # decode up to the newest frame
                if not cap.grab():
                    cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
                    if not cap.grab():
                        raise RuntimeError(f"cannot read {video} after rewinding")
                read += 1
            ok, frame = cap.retrieve()
            if not ok:
                raise RuntimeError(f"cannot decode {video}")
            tracks, known = self.step(frame)
            done = time.time()
            if now >= t0:
                processed += 1
                dropped += skipped
            pts = read / fps
            for tid, box, k in zip(tracks.track_ids.tolist(), tracks.boxes.tolist(),
                                   known.tolist()):
                if tid not in seen:
                    seen.add(tid)
                    events.append({"type": "recognized" if k else "unknown", "ts": done,
                                   "capture_ts": start + pts, "frame_pts": round(pts, 4),
                                   "bbox": box, "latency_ms": round((done - start - pts) * 1000,
                                                                    1)})
        cap.release()
        return {"seconds": round(t1 - t0, 2), "fps_played": fps,
                "fps_processed": round(processed / (t1 - t0), 3),
                "frames_dropped": dropped, "dropped_fraction": round(dropped / max(1, dropped +
                                                                                   processed), 3),
                "window_wall": [t0, t1], "events": events}


def naive_from_args(args, detector: Path, embedder: Path, gallery: np.ndarray | None) -> NaiveLoop:
    """The baseline with the daemon's defaults plus the benchmark's models/threads/providers."""
    return NaiveLoop(bench_config(args, detector, embedder), gallery)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(p, seconds=20, warmup=3, rounds=1)
    args = apply_quick(p.parse_args(), seconds=4, warmup=1)
    detector, embedder = model_paths(args.models)
    video = clip_path(args.video)
    env = environment()
    loop = naive_from_args(args, detector, embedder, None)
    loop.gallery = synthetic_embeddings(args.gallery_size, loop.embedder.embedding_size)
    runs = []
    for r in range(args.rounds):
        log(f"naive loop round {r + 1}/{args.rounds}: {args.seconds:.0f} s")
        runs.append(loop.run(video, args.seconds, args.warmup))
    emit({"benchmark": "naive_loop", "video": str(video), "models": str(args.models),
          "threads": args.threads, "providers": args.providers, "gallery_size": args.gallery_size,
          "fps": rnd(float(np.median([r["fps"] for r in runs])), 3), "runs": runs,
          "environment": env})


if __name__ == "__main__":
    main()
