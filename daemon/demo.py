"""`facewatch demo`: the whole product on a built-in input, with no network and no camera.

It builds a video from photos (the shared face set when present, plus matplotlib's Grace Hopper
sample so a bare machine has a demo too), enrolls each person from a different photo than the
ones in the video, runs the real daemon on the video and prints the events it publishes.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

import cv2
import numpy as np

from facewatch.daemon.file_run import file_config, load_models, run_daemon
from facewatch.stages.embed_stage import read_embedder_info
from facewatch.training.paths import runs_dir, shared_data_dir

log = logging.getLogger("facewatch.demo")
FPS = 25
SCENE_SECONDS = 2.4
CANVAS = (960, 540)  # w, h


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", type=Path, default=None, help="default runs/demo")
    parser.add_argument("--models", type=Path, default=None,
                        help="folder with the three models (default: the shipped models)")
    parser.add_argument("--timeout", type=float, default=300.0, help="give up after this many s")


def grace_hopper() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"


def demo_people(workdir: Path) -> tuple[dict[str, list[Path]], list[Path]]:
    """Enrollment photos per person and the photos that appear in the video (never the same)."""
    enroll: dict[str, list[Path]] = {}
    scenes: list[Path] = []
    knn = shared_data_dir() / "faces_small" / "knn_examples"
    if (knn / "train").is_dir():
        for person in sorted(p for p in (knn / "train").iterdir() if p.is_dir()):
            enroll[person.name] = sorted(person.glob("*.jp*g"))
        scenes += sorted((knn / "test").glob("*.jp*g"))
    # Grace Hopper: enroll from a tighter, mirrored, darker copy; the video shows the original.
    photo = cv2.imread(str(grace_hopper()))
    h, w = photo.shape[:2]
    variant = cv2.flip(photo[int(h * 0.05):int(h * 0.75), int(w * 0.1):int(w * 0.9)], 1)
    variant = cv2.convertScaleAbs(variant, alpha=0.8, beta=10)
    enroll_path = workdir / "enroll_grace_hopper.jpg"
    cv2.imwrite(str(enroll_path), variant)
    enroll["grace_hopper"] = [enroll_path]
    scenes.append(grace_hopper())
    return enroll, scenes


def write_video(path: Path, photos: list[Path]) -> int:
    """Each photo drifts and zooms slowly across the canvas for SCENE_SECONDS: moving faces."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), FPS, CANVAS)
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write {path}")
    frames = 0
    cw, ch = CANVAS
    for photo in photos:
        image = cv2.imread(str(photo))
        if image is None:
            continue
        base = min(cw / image.shape[1], ch / image.shape[0]) * 0.8
        steps = int(SCENE_SECONDS * FPS)
        for i in range(steps):
            t = i / steps
            scale = base * (0.9 + 0.2 * t)
            img = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
            canvas = np.full((ch, cw, 3), 40, np.uint8)
            x = int((cw - img.shape[1]) / 2 + 40 * math.sin(2 * math.pi * t))
            y = int((ch - img.shape[0]) / 2)
            x0, y0 = max(x, 0), max(y, 0)
            x1, y1 = min(x + img.shape[1], cw), min(y + img.shape[0], ch)
            canvas[y0:y1, x0:x1] = img[y0 - y:y1 - y, x0 - x:x1 - x]
            writer.write(canvas)
            frames += 1
    writer.release()
    return frames


def enroll_all(gallery_path: Path, people: dict[str, list[Path]], models: Path) -> None:
    from facewatch.daemon.enrollment import enroll_images
    from facewatch.stages.gallery import Gallery

    detector, embedder = load_models(models / "face_detector.onnx", models / "face_embedder.onnx",
                                     models / "face_landmarks.onnx")
    with Gallery(gallery_path) as gallery:
        for name, photos in people.items():
            try:
                result = enroll_images(gallery, name, photos, detector, embedder)
                print(f"enrolled {name} from {len(result.samples)} photo(s)", flush=True)
            except ValueError as exc:  # a demo photo that fails the quality check: say so, go on
                print(f"not enrolled {name}: {exc}", flush=True)


def print_event(event: dict, counts: dict) -> None:
    counts[event["type"]] = counts.get(event["type"], 0) + 1
    event.pop("snapshot_jpeg", None)
    print(json.dumps(event), flush=True)


def run(args: argparse.Namespace) -> int:
    if args.models is None:
        from facewatch.stages.model_files import models_dir

        args.models = models_dir()
    workdir = Path(args.workdir or runs_dir() / "demo")
    workdir.mkdir(parents=True, exist_ok=True)
    for name in ("face_detector.onnx", "face_embedder.onnx"):
        if not (args.models / name).is_file():
            raise FileNotFoundError(f"model not found: {args.models / name}")
    people, scenes = demo_people(workdir)
    video = workdir / "demo.mp4"
    frames = write_video(video, scenes)
    print(f"demo video {video}: {frames} frames from {len(scenes)} photos", flush=True)
    gallery = workdir / "gallery.db"
    gallery.unlink(missing_ok=True)
    enroll_all(gallery, people, args.models)

    config = file_config(video, "demo", args.models / "face_detector.onnx",
                         args.models / "face_embedder.onnx", gallery, workdir / "events.jsonl",
                         landmarks=args.models / "face_landmarks.onnx")
    # The daemon's own open-set operating point (match.target_far, 1% of decisions on strangers
    # may name someone): the threshold follows the size of this small gallery.
    info = read_embedder_info(args.models / "face_embedder.onnx")
    if info.far_table is not None:
        from facewatch.stages.gallery import Gallery
        from facewatch.stages.open_set import operating_point

        with Gallery(gallery, create=False) as g:
            size = len(g.snapshot())
        point = operating_point(info.far_table, 0.01, size)
        print(f"match {point.describe()}", flush=True)
    counts: dict = {}
    code = run_daemon(config, workdir / "config.yaml", args.timeout,
                      on_event=lambda event: print_event(event, counts))
    print(f"daemon exited {code}; events by type: {json.dumps(counts)}; "
          f"event log {workdir / 'events.jsonl'}", flush=True)
    return code
