"""The daemon's throughput and latency on the CPU, against the naive single-process loop.

    python -m bench.bench_pipeline [--models DIR] [--rounds 3] [--seconds 30] [--quick]

Throughput mode: the real `facewatch run` (supervisor and every stage process) on the 1080p clip,
looped, `realtime: false` (every frame, as fast as the pipeline takes them), metrics on a free
port. After a warm-up, frames/s is the increase of facewatch_frames_processed_total between two
/metrics scrapes `--seconds` apart. The baseline (bench.naive_loop: same models, same settings)
runs over a window of the same length, alternating with the daemon (daemon first in odd
rounds, naive first in even ones; the daemon is started afresh each round and stopped before the
baseline runs). Reported: daemon and naive frames/s and their ratio (median over rounds, and per
round), end-to-end latency p50/p99 of the events published in the window (capture wall time to
publish: of every decision, of decisions made on their votes, and of track_ended events, i.e.
the transit time of a frame; see bench.common.measure_window), frames dropped, memory and CPU
per process. In this mode latency includes the frames queued ahead of the detector, since the
captures read ahead as far as their queues allow.

Real-time mode (`realtime: true`, the clip played at its 25 fps like a camera, dropping frames
when behind): frames/s, drops, latency, and how long after a face first appears its first event
is published. The clip is played with `--gap-s` seconds of blank frames appended, so every face
leaves and re-enters on each loop (each loop is a fresh appearance). A face's first appearance is
the first frame of the loop in which the detector (same model and settings, run offline over the
clip with the same tracker) finds it; an event is attributed to a face by its frame (frame_pts)
and box (IoU). Delay of an appearance = event.ts - capture wall time of the appearance frame
= (ts - capture_ts) + (frame_pts - appearance pts), since a paced file is read at wall = pts + C.
Baseline, run right after over a window of the same length: the naive loop fed the same clip
in real time (it always takes the newest frame; its "event" for a face is the first frame on
which it tracked, embedded and matched it, with no voting; bench.naive_loop.run_realtime).
`first_event_paired` compares the two on the faces both decided, face by face (each face's
median over the loops), since each side's p50 is over its own decided appearances.
"""
from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import (DECISION_TYPES, add_common_arguments, apply_quick, clip_path, emit,
                          environment, latency_fields, log, make_gallery, median, model_paths,
                          ratio, rnd, run_daemon_window, summary)
from bench.naive_loop import naive_from_args


def throughput_rounds(args, video: Path, detector: Path, embedder: Path, gallery_db: Path,
                      naive) -> dict:
    camera = [{"name": "cam0", "uri": str(video), "loop": True, "realtime": False}]
    rounds = []
    for r in range(args.rounds):
        order = ("daemon", "naive") if r % 2 == 0 else ("naive", "daemon")
        result = {}
        for who in order:
            log(f"round {r + 1}/{args.rounds}: {who}, {args.warmup:.0f} s warm-up + "
                f"{args.seconds:.0f} s")
            if who == "daemon":
                result["daemon"] = run_daemon_window(camera, args, detector, embedder, gallery_db,
                                                     args.warmup, args.seconds)
            else:
                result["naive"] = naive.run(video, args.seconds, args.warmup)
        result["ratio_fps"] = ratio(result["daemon"]["fps"], result["naive"]["fps"])
        rounds.append(result)
    d = [r["daemon"] for r in rounds]
    n = [r["naive"] for r in rounds]
    return {
        "daemon_fps": rnd(median([x["fps"] for x in d]), 3),
        "naive_fps": rnd(median([x["fps"] for x in n]), 3),
        "ratio_daemon_over_naive": rnd(median([r["ratio_fps"] for r in rounds]), 3),
        **latency_fields(d),
        "naive_frame_latency_ms_p50": rnd(median([x["latency_ms"]["p50"] for x in n]), 1),
        "naive_frame_latency_ms_p99": rnd(median([x["latency_ms"]["p99"] for x in n]), 1),
        "frames_dropped": int(sum(x["frames_dropped"] for x in d)),
        "messages_lost": int(sum(x["messages_lost"] for x in d)),
        "faces_embedded_per_frame": {"daemon": rnd(median([x["faces_embedded_per_frame"]
                                                            for x in d]), 3),
                                     "naive": rnd(median([x["faces_embedded_per_frame"]
                                                          for x in n]), 3)},
        "rss_mb_total": rnd(median([x["rss_mb_total"] for x in d]), 1),
        "rounds": rounds,
    }


# --- real-time mode: time from a face's first appearance to its first event ---------------

def make_gap_clip(src: Path, dst: Path, gap_s: float) -> tuple[int, float]:
    """The clip followed by `gap_s` of blank frames; returns (frames, fps)."""
    import cv2

    cap = cv2.VideoCapture(str(src))
    fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
    w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
    writer = cv2.VideoWriter(str(dst), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    if not writer.isOpened():
        raise RuntimeError(f"cv2.VideoWriter cannot write {dst}")
    n = 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        writer.write(frame)
        n += 1
    cap.release()
    blank = np.full((h, w, 3), 96, np.uint8)
    for _ in range(max(1, round(gap_s * fps))):
        writer.write(blank)
        n += 1
    writer.release()
    return n, fps


def iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    if len(boxes) == 0:
        return np.zeros(0)
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-9)


class OfflineFaces:
    """One pass of the detector and the daemon's tracker over every frame of the clip.

    `pts[f]`: the media time the capture stage gives frame f of the first loop; `period`: how
    much later the next loop's frames are stamped (last pts + one frame, as capture does).
    `tracks[f]`: (ids, boxes) tracked at frame f; `first[id]`: the frame where the detector first
    found that face (the tracker confirms a new face a frame or so after the detector sees it,
    so each track's start is traced back through overlapping detections)."""

    def __init__(self, clip: Path, naive):
        import cv2

        cap = cv2.VideoCapture(str(clip))
        fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
        naive.reset()
        self.pts, self.tracks, dets, last = [], [], [], -1.0
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            pts = cap.get(cv2.CAP_PROP_POS_MSEC) / 1000.0
            if pts <= last:
                pts = last + 1.0 / fps
            last = pts
            d = naive.detector.detect([frame])[0]
            t = naive.tracker.update(d, frame)
            self.pts.append(pts)
            dets.append(d.boxes)
            self.tracks.append((t.track_ids.copy(), t.boxes.copy()))
        cap.release()
        self.fps = fps
        self.period = self.pts[-1] + 1.0 / fps
        self.first: dict[int, int] = {}
        for f, (ids, boxes) in enumerate(self.tracks):
            for tid, box in zip(ids.tolist(), boxes):
                if tid in self.first:
                    continue
                start, b = f, box
                while start > 0:   # back through the detector's boxes of the same face
                    o = iou(b, dets[start - 1])
                    if not len(o) or o.max() < 0.5:
                        break
                    start -= 1
                    b = dets[start][int(o.argmax())]
                self.first[tid] = start

    def locate(self, frame_pts: float, bbox) -> tuple[int, int | None, float]:
        """(loop, face id or None, IoU) for an event's frame and box."""
        k = math.floor((frame_pts + 1e-3) / self.period)
        t = frame_pts - k * self.period
        f = int(np.argmin(np.abs(np.asarray(self.pts) - t)))
        ids, boxes = self.tracks[f]
        o = iou(np.asarray(bbox, np.float32), boxes)
        if not len(o) or o.max() < 0.3:
            return k, None, float(o.max()) if len(o) else 0.0
        return k, int(ids[int(o.argmax())]), float(o.max())

    def appearance_pts(self, loop: int, face: int) -> float:
        return loop * self.period + self.pts[self.first[face]]


def first_event_delays(offline: OfflineFaces, events: list[dict], window: tuple[float, float],
                       within: list[float]) -> tuple[dict, dict[int, float]]:
    """Per face appearance (loop, face) whose appearance lies in the window (leaving max(within)
    seconds at its end for the event to come): the delay to its first event. Returns the
    summary and, for `paired_first_events`, each face of the clip's median delay over the
    window's loops."""
    t0, t1 = window
    decisions = sorted((e for e in events if e["type"] in DECISION_TYPES and e["ts"] <= t1),
                       key=lambda e: e["ts"])
    if not decisions:
        return {"appearances": 0, "decided": 0, "note": "no decisions in the window"}, {}
    offsets = [e["capture_ts"] - e["frame_pts"] for e in decisions]
    c = float(np.median(offsets))    # wall = pts + c for a file played in real time
    tail = max(within)
    first: dict[tuple, dict] = {}
    unmatched = 0
    for e in decisions:
        loop, face, _ = offline.locate(e["frame_pts"], e["bbox"])
        if face is None:
            unmatched += 1
            continue
        first.setdefault((loop, face), e)
    loops = range(math.floor((t0 - c) / offline.period) - 1, math.ceil((t1 - c) / offline.period) + 1)
    appearances = [(k, j) for k in loops for j in offline.first
                   if t0 <= offline.appearance_pts(k, j) + c <= t1 - tail]
    delays, waits, processing = [], [], []
    to_crop, voting, steps, votes = [], [], {}, []
    per_face: dict[int, list[float]] = {}
    for k, j in appearances:
        e = first.get((k, j))
        if e is None:
            continue
        wait = e["frame_pts"] - offline.appearance_pts(k, j)
        proc = e["ts"] - e["capture_ts"]
        delays.append(wait + proc)
        per_face.setdefault(j, []).append(wait + proc)
        waits.append(wait)
        processing.append(proc)
        votes.append(e.get("votes"))
        if e.get("first_pts") is not None:   # the daemon's events say where the media wait went
            to_crop.append(e["first_pts"] - offline.appearance_pts(k, j))
            voting.append(e["frame_pts"] - e["first_pts"])
        for name, ms in (e.get("timing_ms") or {}).items():
            steps.setdefault(name, []).append(ms)
    n = len(appearances)
    result = {
        "appearances": n,
        "faces_per_loop": len(offline.first),
        "decided": len(delays),
        "first_event_delay_s": summary(delays, digits=3),
        "of_which_media_wait_s": summary(waits, digits=3),
        "of_which_processing_s": summary(processing, digits=3),
        # media wait = until the track's first embedded (good) crop + waiting for more votes
        "media_wait_until_first_crop_s": summary(to_crop, digits=3) if to_crop else None,
        "media_wait_for_votes_s": summary(voting, digits=3) if voting else None,
        "votes_of_first_event": summary(votes, digits=1),
        # processing, step by step (p50 per step, ms; from the events' timing_ms)
        "processing_steps_ms_p50": {name: rnd(median(v), 1) for name, v in steps.items()}
        if steps else None,
        "within_s": {f"{w:g}": rnd(sum(d <= w for d in delays) / n, 3) if n else None
                     for w in within},
        "censored_after_s": tail,
        "events_not_attributed": unmatched,
        "pacing_spread_s": rnd(max(offsets) - min(offsets), 3),
        "loop_period_s": rnd(offline.period, 3),
    }
    return result, {j: float(np.median(v)) for j, v in per_face.items()}


def paired_first_events(mine: dict[int, float], theirs: dict[int, float]) -> dict:
    """The first-event delay on the faces both decided, face by face. Each side's p50 is over
    its own decided appearances, and the one that decides more small, late faces is charged for
    them there; here each face of the clip counts once, with its median delay over the loops
    (`mine`: the daemon's, `theirs`: the naive loop's, face -> seconds)."""
    both = sorted(set(mine) & set(theirs))
    diffs = [mine[j] - theirs[j] for j in both]
    return {
        "faces": len(both),
        "only_daemon": len(set(mine) - set(theirs)),
        "only_naive": len(set(theirs) - set(mine)),
        "daemon_p50_s": rnd(median([mine[j] for j in both]), 3) if both else None,
        "naive_p50_s": rnd(median([theirs[j] for j in both]), 3) if both else None,
        "daemon_minus_naive_p50_s": rnd(median(diffs), 3) if both else None,
        "daemon_no_later": rnd(sum(d <= 0 for d in diffs) / len(diffs), 3) if both else None,
    }


def realtime_mode(args, video: Path, detector: Path, embedder: Path, gallery_db: Path, naive,
                  workdir: Path) -> dict:
    clip = workdir / "clip_with_gap.mp4"
    frames, fps = make_gap_clip(video, clip, args.gap_s)
    log(f"real-time mode: offline detection over the {frames} frames of the clip")
    offline = OfflineFaces(clip, naive)
    camera = [{"name": "live", "uri": str(clip), "loop": True, "realtime": True}]
    log(f"real-time mode: daemon at {fps:g} fps, {args.warmup:.0f} s warm-up + "
        f"{args.realtime_seconds:.0f} s")
    result = run_daemon_window(camera, args, detector, embedder, gallery_db, args.warmup,
                               args.realtime_seconds, keep_events=True)
    events = result.pop("_events")
    first, first_faces = first_event_delays(offline, events, tuple(result["window_wall"]),
                                            args.within)
    log(f"real-time mode: naive loop at {fps:g} fps, {args.warmup:.0f} s warm-up + "
        f"{args.realtime_seconds:.0f} s")
    base = naive.run_realtime(clip, args.realtime_seconds, args.warmup)
    base_first, base_faces = first_event_delays(offline, base.pop("events"),
                                                tuple(base["window_wall"]), args.within)
    paired = paired_first_events(first_faces, base_faces)
    p50 = (first.get("first_event_delay_s") or {}).get("p50")
    base_p50 = (base_first.get("first_event_delay_s") or {}).get("p50")
    return {
        "fps_played": fps, "gap_s": args.gap_s,
        "fps_processed": result["fps"],
        "processed_over_played": ratio(result["fps"], fps),
        "frames_dropped": result["frames_dropped"],
        "dropped_fraction": ratio(result["frames_dropped"], result["frames_captured"]),
        **latency_fields([result]),
        "first_event": first,
        "naive": {"fps_processed": base["fps_processed"],
                  "dropped_fraction": base["dropped_fraction"], "first_event": base_first},
        "ratio_fps_processed_daemon_over_naive": ratio(result["fps"], base["fps_processed"]),
        "ratio_first_event_p50_daemon_over_naive": ratio(p50, base_p50),
        "first_event_paired": paired,
        "daemon": result,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(p, seconds=30, warmup=10, rounds=3)
    p.add_argument("--modes", nargs="+", choices=("throughput", "realtime"),
                   default=["throughput", "realtime"])
    p.add_argument("--realtime-seconds", type=float, default=60,
                   help="window of the real-time mode (and of its baseline)")
    p.add_argument("--within", type=float, nargs="+", default=[1.0, 2.0, 5.0],
                   help="report the share of faces whose first event came within these seconds")
    p.add_argument("--gap-s", type=float, default=1.6,
                   help="blank seconds appended to the clip in real-time mode (more than "
                        "detect.track_buffer frames, so tracks end between loops)")
    args = apply_quick(p.parse_args(), seconds=6, warmup=3)
    if args.quick:
        args.realtime_seconds = min(args.realtime_seconds, 15)
        args.within = [w for w in args.within if w < args.realtime_seconds / 2] or [1.0]
    detector, embedder = model_paths(args.models)
    video = clip_path(args.video)
    env = environment()
    workdir = Path(tempfile.mkdtemp(prefix="fwbp-"))
    try:
        gallery_db = workdir / "gallery.db"
        matrix = make_gallery(gallery_db, embedder, args.gallery_size)
        naive = naive_from_args(args, detector, embedder, matrix)
        out = {"benchmark": "pipeline", "video": str(video), "models": str(args.models),
               "threads": args.threads, "providers": args.providers,
               "config_overrides": args.set, "gallery_size": args.gallery_size,
               "seconds": args.seconds, "warmup": args.warmup, "rounds": args.rounds,
               "baseline": "naive single-process loop (bench.naive_loop)"}
        started = time.monotonic()
        if "throughput" in args.modes:
            out["throughput"] = throughput_rounds(args, video, detector, embedder, gallery_db,
                                                  naive)
        if "realtime" in args.modes:
            out["realtime"] = realtime_mode(args, video, detector, embedder, gallery_db, naive,
                                            workdir)
        out["duration_s"] = round(time.monotonic() - started, 1)
        out["environment"] = env
        emit(out)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
