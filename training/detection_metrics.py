"""Detection AP at IoU 0.5 with VOC all-point interpolation, with "ignore" ground truth.

A detection whose best match is an ignored face (WIDER `invalid`, or too small for the size
band being scored) counts as neither hit nor miss; ignored faces are not in the recall's total.
"""
from __future__ import annotations

import numpy as np


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in a (N, 4) with every box in b (M, 4), x1y1x2y2."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)), np.float32)
    tl = np.maximum(a[:, None, :2], b[None, :, :2])
    br = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(br - tl, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def match_image(boxes, scores, gt_boxes, gt_ignore, iou_threshold=0.5):
    """Return (scores, is_tp) of the detections that count, and the number of counted faces."""
    order = np.argsort(-scores)
    boxes, scores = boxes[order], scores[order]
    ious = iou_matrix(boxes, gt_boxes)
    taken = np.zeros(len(gt_boxes), bool)
    kept_scores, tps = [], []
    for d in range(len(boxes)):
        if len(gt_boxes):
            g = int(np.argmax(ious[d]))
            if ious[d, g] >= iou_threshold:
                if gt_ignore[g]:
                    continue  # neither hit nor miss
                kept_scores.append(scores[d])
                tps.append(not taken[g])
                taken[g] = True
                continue
        kept_scores.append(scores[d])
        tps.append(False)
    return np.array(kept_scores, np.float32), np.array(tps, bool), int((~gt_ignore).sum())


def precision_recall(scores: np.ndarray, tps: np.ndarray, n_positive: int):
    order = np.argsort(-scores, kind="stable")
    tp = np.cumsum(tps[order])
    fp = np.cumsum(~tps[order])
    recall = tp / max(n_positive, 1)
    precision = tp / np.maximum(tp + fp, 1)
    return precision, recall


def average_precision(precision: np.ndarray, recall: np.ndarray) -> float:
    """VOC all-point interpolation: area under the monotone precision envelope."""
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[1.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    idx = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[idx + 1] - mrec[idx]) * mpre[idx + 1]))


def recall_at_precision(precision: np.ndarray, recall: np.ndarray, min_precision: float) -> float:
    ok = precision >= min_precision
    return float(recall[ok].max()) if np.any(ok) else 0.0


def evaluate(per_image, min_height: float = 0.0, iou_threshold: float = 0.5,
             max_height: float = np.inf) -> dict:
    """per_image: iterable of (det_boxes, det_scores, gt_boxes, gt_invalid). Faces outside
    [min_height, max_height) pixels tall are ignored: a size band is scored on its own."""
    all_scores, all_tps, n_pos = [], [], 0
    for boxes, scores, gt_boxes, gt_invalid in per_image:
        heights = gt_boxes[:, 3] - gt_boxes[:, 1]
        ignore = gt_invalid | (heights < min_height) | (heights >= max_height)
        s, t, n = match_image(boxes, scores, gt_boxes, ignore, iou_threshold)
        all_scores.append(s)
        all_tps.append(t)
        n_pos += n
    scores = np.concatenate(all_scores) if all_scores else np.zeros(0, np.float32)
    tps = np.concatenate(all_tps) if all_tps else np.zeros(0, bool)
    precision, recall = precision_recall(scores, tps, n_pos)
    return {"ap50": average_precision(precision, recall),
            "recall_at_p90": recall_at_precision(precision, recall, 0.9), "faces": n_pos}


def recall_by_attribute(per_image, attribute_names: dict, min_score: float,
                        min_height: float = 0.0) -> dict:
    """Share of valid faces at least `min_height` px tall that some detection scoring >=
    `min_score` covers at IoU >= 0.5, for each value of each attribute: where a detector's
    misses are. per_image: iterable of (det_boxes, det_scores, gt_boxes, gt_invalid,
    gt_attributes (N, len(attribute_names)) ints); attribute_names: {name: value labels}."""
    found, attrs = [], []
    for boxes, scores, gt_boxes, gt_invalid, gt_attributes in per_image:
        heights = gt_boxes[:, 3] - gt_boxes[:, 1]
        keep = ~gt_invalid & (heights >= min_height)
        ious = iou_matrix(boxes[scores >= min_score], gt_boxes[keep])
        found.append(ious.max(axis=0) >= 0.5 if ious.size else np.zeros(int(keep.sum()), bool))
        attrs.append(gt_attributes[keep])
    found = np.concatenate(found) if found else np.zeros(0, bool)
    attrs = np.concatenate(attrs) if attrs else np.zeros((0, len(attribute_names)), np.int8)
    out = {}
    for column, (name, labels) in enumerate(attribute_names.items()):
        out[name] = {label: {"faces": int((attrs[:, column] == value).sum()),
                             "recall": round(float(found[attrs[:, column] == value].mean()), 4)
                             if (attrs[:, column] == value).any() else None}
                     for value, label in enumerate(labels)}
    return out
