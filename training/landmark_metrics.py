"""Landmark error of a detector against five-point labels: NME normalised by inter-ocular distance.

Points are in `training.dlib_teacher.LANDMARK_NAMES` order: the two corners of the eye on the
image's right, the two of the eye on its left, the nose bottom. The inter-ocular distance is the
distance between the two eye centres (each the mean of its two corners), taken from the label.
With `layout="arcface"` (YuNet's points: eye centres, nose tip, mouth corners) the eye centres are
the first two points.
"""
from __future__ import annotations

import numpy as np

from facewatch.training.detection_metrics import iou_matrix

NME_GOOD = 0.1  # the usual "failure" threshold of inter-ocular NME


def inter_ocular(points: np.ndarray, layout: str = "dlib") -> np.ndarray:
    """(N,) distance between the eye centres of (N, 5, 2) points."""
    points = np.asarray(points, np.float64).reshape(-1, 5, 2)
    if layout == "arcface":
        return np.linalg.norm(points[:, 0] - points[:, 1], axis=1)
    if layout != "dlib":
        raise ValueError(f"landmark layout must be 'dlib' or 'arcface', got {layout!r}")
    return np.linalg.norm(points[:, 0:2].mean(axis=1) - points[:, 2:4].mean(axis=1), axis=1)


def landmark_nme(predicted: np.ndarray, target: np.ndarray, layout: str = "dlib") -> np.ndarray:
    """(N,) mean over the five points of |predicted - target| (Euclidean), divided by the
    target's inter-ocular distance. A target with coincident eyes gives inf."""
    predicted = np.asarray(predicted, np.float64).reshape(-1, 5, 2)
    target = np.asarray(target, np.float64).reshape(-1, 5, 2)
    if predicted.shape != target.shape:
        raise ValueError(f"predicted {predicted.shape} and target {target.shape} landmarks differ in shape")
    error = np.linalg.norm(predicted - target, axis=2).mean(axis=1)
    iod = inter_ocular(target, layout)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(iod > 0, error / np.where(iod > 0, iod, 1.0), np.inf)


def match_faces(boxes: np.ndarray, scores: np.ndarray, gt_boxes: np.ndarray,
                iou_threshold: float = 0.5) -> list[tuple[int, int]]:
    """Greedy one-to-one matching, highest score first: (detection, face) index pairs with
    IoU >= iou_threshold."""
    ious = iou_matrix(np.asarray(boxes, np.float32), np.asarray(gt_boxes, np.float32))
    taken = np.zeros(len(gt_boxes), bool)
    pairs = []
    for d in np.argsort(-np.asarray(scores), kind="stable"):
        if not len(gt_boxes):
            break
        candidates = np.where(taken, -1.0, ious[d])
        g = int(np.argmax(candidates))
        if candidates[g] >= iou_threshold:
            taken[g] = True
            pairs.append((int(d), g))
    return pairs


def summarise_nme(nme: np.ndarray, faces_labelled: int) -> dict:
    """Mean, median and fraction under NME_GOOD of per-face NMEs; `faces_labelled` is how many
    labelled faces there were to match (so the share that was matched is visible)."""
    nme = np.asarray(nme, np.float64)
    if not len(nme):
        return {"nme": None, "nme_median": None, "nme_under_0_1": None, "landmark_faces": 0,
                "landmark_faces_labelled": int(faces_labelled)}
    return {"nme": round(float(nme.mean()), 4), "nme_median": round(float(np.median(nme)), 4),
            "nme_under_0_1": round(float((nme < NME_GOOD).mean()), 4), "landmark_faces": int(len(nme)),
            "landmark_faces_labelled": int(faces_labelled)}
