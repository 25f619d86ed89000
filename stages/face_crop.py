"""The one face crop: the daemon, enrollment, embedder training and evaluation all call this.

A detector box [x1, y1, x2, y2] (frame pixels) becomes a square, centred crop whose side is
`scale` times the box's longer side, resized to `size` x `size`. Parts outside the frame are
filled by replicating the border, so faces at the frame edge keep their position in the crop.
"""
from __future__ import annotations

import cv2
import numpy as np

DEFAULT_CROP_SIZE = 112
DEFAULT_CROP_SCALE = 1.3


def crop_face(frame: np.ndarray, box, size: int = DEFAULT_CROP_SIZE,
              scale: float = DEFAULT_CROP_SCALE) -> np.ndarray:
    """Return a `size` x `size` x 3 uint8 crop of `frame` (same channel order as the frame)."""
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"frame must be HxWx3, got shape {frame.shape}")
    x1, y1, x2, y2 = (float(v) for v in box)
    if not (x2 > x1 and y2 > y1):
        raise ValueError(f"box must have x2 > x1 and y2 > y1, got {list(box)}")
    side = max(x2 - x1, y2 - y1) * scale
    cx, cy = (x1 + x2) / 2.0, (y1 + y2) / 2.0
    k = size / side
    # Affine map: frame -> crop, so that (cx, cy) lands on the crop centre.
    matrix = np.array([[k, 0.0, size / 2.0 - k * cx], [0.0, k, size / 2.0 - k * cy]], np.float32)
    interpolation = cv2.INTER_AREA if k < 1.0 else cv2.INTER_LINEAR
    return cv2.warpAffine(frame, matrix, (size, size), flags=interpolation,
                          borderMode=cv2.BORDER_REPLICATE)


def crop_faces(frame: np.ndarray, boxes: np.ndarray, size: int = DEFAULT_CROP_SIZE,
               scale: float = DEFAULT_CROP_SCALE) -> np.ndarray:
    """Crops for every box, as an N x size x size x 3 uint8 array (N may be 0)."""
    out = np.empty((len(boxes), size, size, 3), np.uint8)
    for i, box in enumerate(boxes):
        out[i] = crop_face(frame, box, size, scale)
    return out
