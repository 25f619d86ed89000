"""The photo check: does the detector find the one face a portrait photo is of?

Enrollment photos are portraits: one face filling much of the picture, sometimes with people
behind. On the LFW validation people's images (never trained on, by the split rule) the check
counts the photos where exactly one detection, at the daemon's confidence, covers the central
face: IoU >= 0.5 with the teacher's box (CenterFace, calibrated to WIDER, the face nearest the
image centre scoring >= 0.5). None is a miss; two are a duplicate the NMS let through.

The teacher's boxes are computed once and cached beside the pseudo-labels (training-time extra).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import numpy as np

from facewatch.training.detection_metrics import iou_matrix

log = logging.getLogger("facewatch.photo_check")
TEACHER_MIN_SCORE = 0.5
COVER_IOU = 0.5


def central_face(boxes: np.ndarray, scores: np.ndarray, shape: tuple[int, int]) -> np.ndarray | None:
    """The box nearest the image centre among those scoring >= TEACHER_MIN_SCORE."""
    keep = scores >= TEACHER_MIN_SCORE
    if not np.any(keep):
        return None
    boxes = boxes[keep]
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    distance = np.linalg.norm(centres - [shape[1] / 2, shape[0] / 2], axis=1)
    return boxes[int(np.argmin(distance))]


def lfw_val_images() -> list[Path]:
    from facewatch.training.lfw import default_images_dir, image_path, list_people, load_split

    images_dir = default_images_dir()
    people = list_people(images_dir)
    return [image_path(images_dir, name, i) for name in load_split(images_dir)["val_people"]
            for i in people[name]]


def teacher_boxes(images: list[Path], cache: Path) -> dict[str, list[float] | None]:
    """image path (relative to its person folder's parent) -> central teacher box, cached."""
    known = json.loads(cache.read_text()) if cache.is_file() else {}
    todo = [p for p in images if f"{p.parent.name}/{p.name}" not in known]
    if todo:
        from facewatch.training.centerface_teacher import CenterFaceTeacher
        from facewatch.training.pseudo_labels import calibration

        teacher = CenterFaceTeacher(calibration=calibration())
        for path in todo:
            image = cv2.imread(str(path))
            box = None
            if image is not None:
                faces = teacher.detect(image)
                found = central_face(faces.boxes, faces.scores, image.shape[:2])
                box = None if found is None else [round(float(v), 2) for v in found]
            known[f"{path.parent.name}/{path.name}"] = box
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(known))
        log.info("teacher boxes for %d photos cached in %s", len(todo), cache)
    return known


def photo_check(detector, images: list[Path], cache: Path) -> dict:
    """Share of photos where exactly one detection covers the teacher's central face."""
    truth = teacher_boxes(images, cache)
    outcome = {"one": 0, "none": 0, "several": 0}
    no_teacher = 0
    for path in images:
        box = truth.get(f"{path.parent.name}/{path.name}")
        image = cv2.imread(str(path)) if box is not None else None
        if image is None:
            no_teacher += 1
            continue
        det = detector.detect([image])[0]
        covering = int((iou_matrix(det.boxes, np.array([box], np.float32))[:, 0] >= COVER_IOU).sum())
        outcome["one" if covering == 1 else "none" if covering == 0 else "several"] += 1
    scored = sum(outcome.values())
    return {"photo_check": round(outcome["one"] / max(scored, 1), 4), "photos": scored,
            "photos_missed": outcome["none"], "photos_duplicated": outcome["several"],
            "photos_without_teacher_face": no_teacher}
