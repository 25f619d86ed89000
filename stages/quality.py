"""Face quality gate: faces too small or too blurred to embed reliably never reach the embedder.

Sharpness is the variance of the Laplacian of the grey *embedder crop*, so it is measured at
the resolution the embedder sees, whatever the camera resolution (enrollment uses the same
measure: daemon/enrollment.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


def sharpness(crops: np.ndarray) -> np.ndarray:
    """(N, S, S, 3) uint8 crops -> (N,) float32 Laplacian variance."""
    out = np.empty(len(crops), np.float32)
    for i, crop in enumerate(crops):
        grey = cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY)
        out[i] = cv2.Laplacian(grey, cv2.CV_64F).var()
    return out


@dataclass(frozen=True)
class QualityGate:
    min_face_px: int      # shorter side of the detector box, frame pixels
    min_blur: float       # minimum sharpness; 0 disables the check

    def __post_init__(self) -> None:
        if self.min_face_px < 1:
            raise ValueError(f"min_face_px must be >= 1, got {self.min_face_px}")
        if self.min_blur < 0:
            raise ValueError(f"min_blur must be >= 0, got {self.min_blur}")

    def too_small(self, boxes: np.ndarray) -> np.ndarray:
        """(N, 4) boxes -> (N,) bool."""
        side = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
        return side < self.min_face_px

    def too_blurred(self, blur: np.ndarray) -> np.ndarray:
        return blur < self.min_blur if self.min_blur > 0 else np.zeros(len(blur), bool)
