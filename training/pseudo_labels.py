"""`facewatch label-faces`: detector training images labelled by the CenterFace teacher.

    facewatch label-faces --source lfw            # LFW training people (never validation people)
    facewatch label-faces --source clip           # frames of the shared 1080p clip
    facewatch label-faces --source DIR --name N   # any folder of face photos (UTKFace, CelebA, ...)

Each source becomes an ultralytics-style folder `runs/detector/pseudo/<name>/` with `images/`
(symlinks to the originals, or decoded video frames) and `labels/` (YOLO `0 cx cy w h`), plus
`report.json` (images seen, kept, dropped and why, boxes).

Labelling policy (a half-labelled image teaches the student that a face is background):
- the teacher's boxes are first calibrated to WIDER's annotation (edge offsets fitted on the
  WIDER *training* split, `training/splits/centerface_wider_calibration.json`);
- a face scoring >= `--confident` becomes a label;
- an image with any face between `--unsure` and `--confident` that is at least `--min-px` tall
  is left out whole, as is one where the teacher finds no face.
Validation images are never labelled: LFW validation people are excluded by the split rule, and
WIDER validation events are not a source.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from collections import Counter
from pathlib import Path

import cv2
import numpy as np

from facewatch.training.centerface_teacher import BoxCalibration, CenterFaceTeacher, fit_calibration, matched_pairs
from facewatch.training.paths import SPLITS_DIR, require_dir, runs_dir, shared_data_dir

log = logging.getLogger("facewatch.label_faces")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
CONFIDENT = 0.6   # teacher precision 0.994 on WIDER training faces at this score
UNSURE = 0.3
MIN_PX = 12
# Fitted once on the WIDER training split and committed, so every labelling run uses the same
# offsets (delete it to refit).
CALIBRATION_FILE = SPLITS_DIR / "centerface_wider_calibration.json"


def pseudo_root() -> Path:
    return runs_dir() / "detector" / "pseudo"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", required=True,
                        help="'lfw' (training people), 'clip' (the shared video) or a folder of images")
    parser.add_argument("--name", default=None, help="output name under runs/detector/pseudo/ "
                                                     "(default: lfw, clip, or the folder's name)")
    parser.add_argument("--confident", type=float, default=CONFIDENT,
                        help=f"teacher score that makes a label (default {CONFIDENT})")
    parser.add_argument("--unsure", type=float, default=UNSURE,
                        help=f"an image with a face scoring between this and --confident is left "
                             f"out (default {UNSURE})")
    parser.add_argument("--min-px", type=float, default=MIN_PX,
                        help=f"unsure faces smaller than this (pixels tall) are ignored (default {MIN_PX})")
    parser.add_argument("--every", type=int, default=2, help="with --source clip: every Nth frame")
    parser.add_argument("--limit", type=int, default=None,
                        help="label at most N images, evenly spaced over the sorted list (file names "
                             "often sort by age or identity)")


def calibration(path: Path | None = None, images: int = 400) -> BoxCalibration:
    """The teacher's WIDER edge offsets, fitted once on the WIDER training split and cached."""
    path = path or CALIBRATION_FILE
    if path.is_file():
        return BoxCalibration.load(path)
    from facewatch.training.wider_gt import read_wider_gt
    from facewatch.training.widerface import load_split

    root = shared_data_dir() / "widerface"
    train = set(load_split()["train"])
    records = [r for r in read_wider_gt(root / "wider_face_bbx_gt.txt") if r.image in train][:images]
    teacher = CenterFaceTeacher()
    teacher_boxes, truth_boxes = [], []
    for record in records:
        image = cv2.imread(str(root / "images" / record.image))
        if image is None:
            continue
        a, b = matched_pairs(teacher.detect(image), record.boxes, record.invalid, CONFIDENT, 16)
        teacher_boxes.append(a)
        truth_boxes.append(b)
    fitted = fit_calibration(np.concatenate(teacher_boxes), np.concatenate(truth_boxes))
    fitted.save(path)
    log.info("teacher box calibration on %d WIDER training images: %s", len(records), fitted)
    return fitted


def lfw_training_images() -> list[Path]:
    from facewatch.training.lfw import default_images_dir, image_path, is_val_person, list_people

    images_dir = default_images_dir()
    return [image_path(images_dir, name, i) for name, indices in list_people(images_dir).items()
            if not is_val_person(name) for i in indices]


def folder_images(folder: Path) -> list[Path]:
    require_dir(folder, "image folder to label")
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def clip_frames(video: Path, out_dir: Path, every: int) -> list[Path]:
    """Decode every Nth frame of the clip to JPEG files (ultralytics reads images, not videos)."""
    capture = cv2.VideoCapture(str(video))
    if not capture.isOpened():
        raise FileNotFoundError(f"video not readable: {video}")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, index = [], 0
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        if index % every == 0:
            path = out_dir / f"{video.stem}_{index:05d}.jpg"
            cv2.imwrite(str(path), frame, [cv2.IMWRITE_JPEG_QUALITY, 95])
            paths.append(path)
        index += 1
    capture.release()
    return paths


def decide(scores: np.ndarray, heights: np.ndarray, confident: float, unsure: float, min_px: float
           ) -> tuple[np.ndarray | None, str]:
    """Which faces label the image, or None and the reason it is left out."""
    if np.any((scores >= unsure) & (scores < confident) & (heights >= min_px)):
        return None, "unsure face"
    keep = scores >= confident
    if not np.any(keep):
        return None, "no confident face"
    return keep, "kept"


def yolo_rows(boxes: np.ndarray, width: int, height: int) -> str:
    cx = (boxes[:, 0] + boxes[:, 2]) / 2 / width
    cy = (boxes[:, 1] + boxes[:, 3]) / 2 / height
    w = (boxes[:, 2] - boxes[:, 0]) / width
    h = (boxes[:, 3] - boxes[:, 1]) / height
    return "".join(f"0 {a:.6f} {b:.6f} {c:.6f} {d:.6f}\n" for a, b, c, d in zip(cx, cy, w, h))


def label_images(images: list[Path], out: Path, teacher: CenterFaceTeacher, confident: float,
                 unsure: float, min_px: float, link: bool = True) -> dict:
    """Write labels (and image links) for the images the policy keeps; return the report."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    outcome: Counter = Counter()
    boxes_total = 0
    for n, path in enumerate(images):
        image = cv2.imread(str(path))
        if image is None:
            outcome["unreadable"] += 1
            continue
        faces = teacher.detect(image, threshold=min(unsure, confident))
        heights = faces.boxes[:, 3] - faces.boxes[:, 1]
        keep, reason = decide(faces.scores, heights, confident, unsure, min_px)
        outcome[reason] += 1
        if keep is None:
            continue
        # a flat name per image: ultralytics finds labels by swapping images/ for labels/
        stem = f"{path.parent.name}__{path.stem}" if link else path.stem
        target = out / "images" / f"{stem}{path.suffix.lower()}"
        if link and not target.is_symlink():
            os.symlink(path.resolve(), target)
        (out / "labels" / f"{stem}.txt").write_text(yolo_rows(faces.boxes[keep], image.shape[1], image.shape[0]))
        boxes_total += int(keep.sum())
        if (n + 1) % 500 == 0:
            log.info("%d / %d images, %d kept, %d boxes", n + 1, len(images), outcome["kept"], boxes_total)
    return {"images_seen": len(images), "images_kept": outcome["kept"], "boxes": boxes_total,
            "left_out": {k: v for k, v in outcome.items() if k != "kept"},
            "policy": {"confident": confident, "unsure": unsure, "min_px": min_px}}


def run(args: argparse.Namespace) -> int:
    fitted = calibration()
    teacher = CenterFaceTeacher(calibration=fitted)
    source = args.source
    name = args.name or (source if source in ("lfw", "clip") else Path(source).name)
    out = pseudo_root() / name
    # labels are derived data: a rerun (other policy, other --limit) starts from an empty folder,
    # so no label of an image the new run leaves out survives in the training set
    for derived in ("images", "labels"):
        shutil.rmtree(out / derived, ignore_errors=True)
    for cache in out.glob("*.cache"):
        cache.unlink()
    link = True
    if source == "lfw":
        images = lfw_training_images()
    elif source == "clip":
        images = clip_frames(shared_data_dir() / "videos" / "facenet_pytorch_video.mp4",
                             out / "images", args.every)
        link = False  # the frames are already in images/
    else:
        images = folder_images(Path(source))
    if args.limit and len(images) > args.limit:
        images = images[:: len(images) // args.limit][: args.limit]
    report = label_images(images, out, teacher, args.confident, args.unsure, args.min_px, link)
    report.update(source=str(source), calibration=fitted.__dict__)
    if not link:  # frames the policy left out are not training images
        labelled = {p.stem for p in (out / "labels").glob("*.txt")}
        for frame in (out / "images").glob("*.jpg"):
            if frame.stem not in labelled:
                frame.unlink()
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({"name": name, **{k: report[k] for k in ("images_seen", "images_kept", "boxes",
                                                              "left_out")}}))
    return 0
