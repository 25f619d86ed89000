"""Detections: parallel numpy arrays, validated at construction (one type for every stage)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Detections:
    boxes: np.ndarray   # (N, 4) float32, [x1, y1, x2, y2] in original frame pixels
    scores: np.ndarray  # (N,) float32
    # (N, 5, 2) float32 frame pixels, stages.face_crop's landmark order; None from a box-only model
    landmarks: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.boxes.ndim != 2 or self.boxes.shape[1] != 4:
            raise ValueError(f"boxes must have shape (N, 4), got {self.boxes.shape}")
        if self.scores.shape != (len(self.boxes),):
            raise ValueError(f"scores must have shape ({len(self.boxes)},), got {self.scores.shape}")
        if self.landmarks is not None and self.landmarks.shape != (len(self.boxes), 5, 2):
            raise ValueError(f"landmarks must have shape ({len(self.boxes)}, 5, 2), "
                             f"got {self.landmarks.shape}")

    def __len__(self) -> int:
        return len(self.boxes)

    @classmethod
    def empty(cls) -> "Detections":
        return cls(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32))

    def __getitem__(self, index) -> "Detections":
        return Detections(self.boxes[index], self.scores[index],
                          None if self.landmarks is None else self.landmarks[index])
