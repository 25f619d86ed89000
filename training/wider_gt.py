"""Reader of the official WIDER FACE ground-truth format (`wider_face_bbx_gt.txt`).

Each record: an image path, a face count, then one line per face
`x y w h blur expression illumination invalid occlusion pose` (a record with no face still has one
all-zero line).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class GroundTruth:
    image: str             # path relative to the images folder
    boxes: np.ndarray      # (N, 4) float32 x1, y1, x2, y2
    invalid: np.ndarray    # (N,) bool: WIDER marks these as not to be scored
    # (N, 5) int8: WIDER's blur, expression, illumination, occlusion, pose per face (ATTRIBUTES)
    attributes: np.ndarray | None = None


# Column order of GroundTruth.attributes, and the values WIDER gives each.
ATTRIBUTES = {"blur": ("clear", "normal", "heavy"), "expression": ("typical", "exaggerated"),
              "illumination": ("normal", "extreme"), "occlusion": ("none", "partial", "heavy"),
              "pose": ("typical", "atypical")}


def read_wider_gt(path: Path) -> list[GroundTruth]:
    lines = [line.strip() for line in Path(path).read_text().splitlines()]
    records, i = [], 0
    try:
        while i < len(lines):
            if not lines[i]:
                i += 1
                continue
            image, count = lines[i], int(lines[i + 1])
            rows = lines[i + 2:i + 2 + max(count, 1)]
            values = np.array([r.split()[:10] for r in rows], dtype=np.float32).reshape(-1, 10)[:count]
            i += 2 + max(count, 1)
            keep = (values[:, 2] > 0) & (values[:, 3] > 0)
            values = values[keep]
            boxes = np.concatenate([values[:, :2], values[:, :2] + values[:, 2:4]], axis=1)
            attributes = values[:, [4, 5, 6, 8, 9]].astype(np.int8)
            records.append(GroundTruth(image, boxes.astype(np.float32), values[:, 7] > 0,
                                       attributes))
    except (ValueError, IndexError) as exc:
        raise ValueError(f"{path}: not in WIDER FACE ground-truth format near line {i + 1} "
                         f"(expected 'image path', 'count', then count lines of 10 numbers): {exc}")
    return records
