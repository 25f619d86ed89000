"""dlib's public-domain face models, used at training time only (never by the daemon).

- `shape_predictor_5_face_landmarks`: five points, in dlib's order: outer and inner corner of
  the eye on the image's right, outer and inner corner of the eye on the image's left, and the
  bottom of the nose (checked by drawing them on LFW images). It has no mouth points; dlib's 68-point model, which has, is not used
  (its training data forbids commercial use).
- `dlib_face_recognition_resnet_model_v1`: the 128-D teacher embedding (0.9938 on LFW, trained on
  about 3 M faces of 7,485 people, none of them in LFW).

Both files ship on PyPI in `face-recognition-models` and run through `dlib-bin`
(`pip install -e .[teacher]`). That package imports `pkg_resources` at import time, which new
setuptools no longer has, so the files are located without importing it.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

LANDMARKS_FILE = "shape_predictor_5_face_landmarks.dat"
RESNET_FILE = "dlib_face_recognition_resnet_model_v1.dat"
TEACHER_DIM = 128
# dlib's point order, reused as the detector's keypoint order; flipping an image swaps the eyes
# (outer stays outer) and keeps the nose.
LANDMARK_NAMES = ("right_eye_outer", "right_eye_inner", "left_eye_outer", "left_eye_inner", "nose_base")
FLIP_INDEX = (2, 3, 0, 1, 4)


def model_file(name: str) -> Path:
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        # FileNotFoundError: the CLI reports it as one line naming what to install.
        raise FileNotFoundError(f"dlib model file {name} not installed: the teacher needs the "
                                f"training extra, pip install -e '.[teacher]' (dlib-bin, "
                                f"face-recognition-models)")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / name
    if not path.is_file():
        raise FileNotFoundError(f"dlib model file missing: {path} (reinstall face-recognition-models)")
    return path


class DlibTeacher:
    """Landmarks and teacher embeddings for faces given by boxes (RGB uint8 images)."""

    def __init__(self, embeddings: bool = True):
        try:
            import dlib
        except ImportError as exc:
            raise FileNotFoundError(f"dlib not installed ({exc}): pip install -e '.[teacher]'") from exc
        self._dlib = dlib
        self.predictor = dlib.shape_predictor(str(model_file(LANDMARKS_FILE)))
        self.resnet = dlib.face_recognition_model_v1(str(model_file(RESNET_FILE))) if embeddings else None

    def _shapes(self, image_rgb: np.ndarray, boxes: np.ndarray):
        rects = [self._dlib.rectangle(int(round(x1)), int(round(y1)), int(round(x2)), int(round(y2)))
                 for x1, y1, x2, y2 in np.asarray(boxes, np.float64)]
        return [self.predictor(image_rgb, r) for r in rects]

    def landmarks(self, image_rgb: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """(N, 5, 2) float32 points in image pixels, dlib's order (see LANDMARK_NAMES)."""
        image_rgb = np.ascontiguousarray(image_rgb)
        shapes = self._shapes(image_rgb, boxes)
        return np.array([[(p.x, p.y) for p in s.parts()] for s in shapes], np.float32).reshape(-1, 5, 2)

    def describe(self, image_rgb: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(landmarks (N, 5, 2), unit teacher embeddings (N, 128)) for the faces in `boxes`."""
        if self.resnet is None:
            raise RuntimeError("DlibTeacher(embeddings=False) cannot describe faces")
        image_rgb = np.ascontiguousarray(image_rgb)
        shapes = self._shapes(image_rgb, boxes)
        if not shapes:
            return np.zeros((0, 5, 2), np.float32), np.zeros((0, TEACHER_DIM), np.float32)
        points = np.array([[(p.x, p.y) for p in s.parts()] for s in shapes], np.float32)
        full = self._dlib.full_object_detections()
        for s in shapes:
            full.append(s)
        vectors = np.array([np.array(v) for v in self.resnet.compute_face_descriptor(image_rgb, full)],
                           np.float32)
        # dlib's descriptors are compared by Euclidean distance (0.6 threshold); as unit vectors
        # their cosine similarities are what the student's distillation loss matches.
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True) + 1e-12
        return points, vectors
