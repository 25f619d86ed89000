"""The one face crop: the daemon, enrollment, embedder training and evaluation all call `crop_faces`.

Three alignments, chosen by the embedder (its ONNX metadata says which one it was trained on):

- `five_point`: a similarity transform (rotation, scale, shift) of the face's five landmarks onto
  a fixed 112x112 template, so eyes and nose land on the same pixels in every crop whatever the
  head roll and the box jitter. Faces without landmarks, or with implausible ones, fall back to
  the template's average position inside the box (same framing, no roll correction); the caller
  counts them from the returned flags. Landmarks in dlib's 5-point layout (eye corners, nose
  bottom).
- `arcface_five_point`: the same, on the standard ArcFace 112x112 template (eye centres, nose
  tip, mouth corners: YuNet's five points, in YuNet's order), the geometry SFace and most public
  face recognisers were trained on. Its fallback is where YuNet's points sit on average in our
  detector's boxes.
- `box`: a square, centred crop whose side is `scale` times the box's longer side (the first
  embedder's crop; kept so that model keeps working).

Parts outside the frame are filled by replicating the border, so faces at the frame edge keep
their position in the crop.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_CROP_SIZE = 112
DEFAULT_CROP_SCALE = 1.3
ALIGNMENTS = ("five_point", "arcface_five_point", "box")
# The landmark layout each landmark-based alignment expects.
LANDMARK_LAYOUTS = {"five_point": "dlib", "arcface_five_point": "arcface"}

# Landmark order of dlib's 5-point model, which labelled our detector's keypoints: outer and inner
# corner of the eye on the image's right, the same for the eye on the image's left, nose bottom.
# Template for a 112 px crop: the mean of ~100 LFW faces' dlib landmarks after a similarity map
# putting the eye centres at (38.3, 51.6) and (73.7, 51.6) (where the common ArcFace template
# has them), made left-right symmetric.
FIVE_POINT_TEMPLATE = np.array([[80.5, 51.6], [67.0, 51.6], [31.5, 51.6], [45.0, 51.6],
                                [56.0, 81.0]], np.float32)
TEMPLATE_SIZE = 112
# The same five points as fractions of our detector's box (x from x1 / width, y from y1 / height),
# averaged over the same faces: the fallback when a face has no usable landmarks.
BOX_RELATIVE_LANDMARKS = np.array([[0.79, 0.39], [0.635, 0.395], [0.215, 0.40], [0.375, 0.40],
                                   [0.52, 0.645]], np.float32)

# The standard ArcFace template of a 112x112 crop (insightface; OpenCV's FaceRecognizerSF.alignCrop
# uses the same), in YuNet's point order: the eye on the image's left, the eye on the image's right,
# nose tip, mouth corner on the image's left, mouth corner on the image's right.
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], np.float32)
ARCFACE_NAMES = ("left_eye_centre", "right_eye_centre", "nose_tip", "mouth_left", "mouth_right")
# YuNet's five points as fractions of our detector's box: the mean over 147 LFW faces (one or two
# photos of every 40th person; YuNet run inside models/face_detector.onnx's box at imgsz 160).
# Against those faces' own points its NME is 0.18 (the five_point fallback's mapped onto this
# template instead: 0.30).
ARCFACE_BOX_RELATIVE = np.array([[0.280, 0.383], [0.715, 0.382], [0.499, 0.565], [0.320, 0.706],
                                 [0.695, 0.712]], np.float32)
# Mirroring a face swaps the eyes and the mouth corners; the nose stays.
ARCFACE_FLIP_INDEX = (1, 0, 2, 4, 3)
TEMPLATES = {"five_point": FIVE_POINT_TEMPLATE, "arcface_five_point": ARCFACE_TEMPLATE}


@dataclass(frozen=True)
class CropSpec:
    size: int = DEFAULT_CROP_SIZE
    alignment: str = "five_point"
    scale: float = DEFAULT_CROP_SCALE  # box alignment only

    def __post_init__(self) -> None:
        if self.alignment not in ALIGNMENTS:
            raise ValueError(f"crop alignment must be one of {ALIGNMENTS}, got {self.alignment!r}")
        if self.size < 16:
            raise ValueError(f"crop size must be >= 16, got {self.size}")


def _check(frame: np.ndarray, box) -> tuple[float, float, float, float]:
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"frame must be HxWx3, got shape {frame.shape}")
    x1, y1, x2, y2 = (float(v) for v in box)
    if not (x2 > x1 and y2 > y1):
        raise ValueError(f"box must have x2 > x1 and y2 > y1, got {list(box)}")
    return x1, y1, x2, y2


def _warp(frame: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    import cv2   # here, not at the top: the embed stage needs only CropSpec (OpenCV: ~17 MB RSS)
    scale = float(np.sqrt(abs(np.linalg.det(matrix[:, :2]))))
    interpolation = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR
    return cv2.warpAffine(frame, matrix.astype(np.float32), (size, size), flags=interpolation,
                          borderMode=cv2.BORDER_REPLICATE)


def box_crop_matrix(box, size: int, scale: float) -> np.ndarray:
    """2x3 affine map from frame pixels to the square `size` crop whose side is `scale` times the
    box's longer side, centred on the box."""
    x1, y1, x2, y2 = (float(v) for v in box)
    side = max(x2 - x1, y2 - y1) * scale
    cx, cy = (x1 + x2) / 2.0, (y1 + y2) / 2.0
    k = size / side
    return np.array([[k, 0.0, size / 2.0 - k * cx], [0.0, k, size / 2.0 - k * cy]], np.float32)


def crop_face(frame: np.ndarray, box, size: int = DEFAULT_CROP_SIZE,
              scale: float = DEFAULT_CROP_SCALE) -> np.ndarray:
    """The `box` alignment: a `size` x `size` x 3 uint8 square crop around the box."""
    _check(frame, box)
    return _warp(frame, box_crop_matrix(box, size, scale), size)


def _similarity(points: np.ndarray, template: np.ndarray) -> np.ndarray | None:
    import cv2   # see _warp
    # Least squares over all five points (LMEDS would drop a point; a 5-point fit needs no robust
    # estimator once implausible sets are rejected).
    matrix, _ = cv2.estimateAffinePartial2D(np.asarray(points, np.float32),
                                            np.asarray(template, np.float32), method=cv2.RANSAC,
                                            ransacReprojThreshold=1e6, refineIters=20)
    return matrix


def box_landmarks(box, alignment: str = "five_point") -> np.ndarray:
    """Where the five landmarks of `alignment`'s layout sit on average inside a detector box:
    (5, 2) frame pixels."""
    x1, y1, x2, y2 = (float(v) for v in box)
    relative = {"five_point": BOX_RELATIVE_LANDMARKS, "arcface_five_point": ARCFACE_BOX_RELATIVE}[alignment]
    return (relative * [x2 - x1, y2 - y1] + [x1, y1]).astype(np.float32)


def eyes_and_nose(points: np.ndarray, layout: str = "dlib") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(eye on the image's right, eye on the image's left, nose) of five points in `layout`
    ("dlib": eye corners and nose bottom; "arcface": YuNet's eye centres, nose tip, mouth)."""
    points = np.asarray(points, np.float64)
    if layout == "dlib":
        return points[0:2].mean(axis=0), points[2:4].mean(axis=0), points[4]
    if layout == "arcface":
        return points[1], points[0], points[2]
    raise ValueError(f"landmark layout must be 'dlib' or 'arcface', got {layout!r}")


def landmarks_plausible(points: np.ndarray, box, layout: str = "dlib") -> bool:
    """False for points that cannot be a face in this box: NaN, eyes swapped or too far apart or
    too close, the nose above the eyes, points well outside the box. `layout` as in
    `eyes_and_nose` (the arcface layout also needs its mouth below its nose)."""
    points = np.asarray(points, np.float64)
    if points.shape != (5, 2) or not np.isfinite(points).all():
        return False
    x1, y1, x2, y2 = (float(v) for v in box)
    w, h = x2 - x1, y2 - y1
    if w <= 0 or h <= 0:
        return False
    margin_x, margin_y = 0.25 * w, 0.25 * h
    if ((points[:, 0] < x1 - margin_x) | (points[:, 0] > x2 + margin_x) |
            (points[:, 1] < y1 - margin_y) | (points[:, 1] > y2 + margin_y)).any():
        return False
    right_eye, left_eye, nose = eyes_and_nose(points, layout)
    eye_axis = right_eye - left_eye
    iod = float(np.hypot(*eye_axis))
    if not 0.15 * w <= iod <= 0.9 * w:
        return False
    if eye_axis[0] <= 0 or abs(np.degrees(np.arctan2(eye_axis[1], eye_axis[0]))) > 60:
        return False
    # The nose must lie below the eye line (image y grows downwards), by a fair part of the IOD.
    eye_centre = (right_eye + left_eye) / 2.0

    def below_eyes(point: np.ndarray) -> float:
        to_point = point - eye_centre
        return float((eye_axis[0] * to_point[1] - eye_axis[1] * to_point[0]) / iod)

    nose_below = below_eyes(nose)
    if layout == "arcface":   # both mouth corners below the nose tip
        return bool(nose_below > 0.2 * iod
                    and min(below_eyes(points[3]), below_eyes(points[4])) > nose_below)
    return bool(nose_below > 0.2 * iod)


def alignment_matrix(points: np.ndarray, size: int = DEFAULT_CROP_SIZE,
                     alignment: str = "five_point") -> np.ndarray:
    """2x3 similarity map (rotation, scale, shift) from frame pixels to the `size` crop that puts
    five landmarks (in `alignment`'s layout) on its template, least squares over the five."""
    if alignment not in TEMPLATES:
        raise ValueError(f"alignment must be one of {tuple(TEMPLATES)}, got {alignment!r}")
    matrix = _similarity(points, TEMPLATES[alignment] * (size / TEMPLATE_SIZE))
    if matrix is None:
        raise ValueError(f"no similarity transform for landmarks {np.asarray(points).tolist()}")
    return matrix.astype(np.float32)


def align_face(frame: np.ndarray, points: np.ndarray, size: int = DEFAULT_CROP_SIZE,
               alignment: str = "five_point") -> np.ndarray:
    """Similarity transform of five landmarks (frame pixels) onto the template, as a size x size crop."""
    return _warp(frame, alignment_matrix(points, size, alignment), size)


def crop_faces(frame: np.ndarray, boxes: np.ndarray, spec: CropSpec = CropSpec(),
               landmarks: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Crops for every box: (N x size x size x 3 uint8 in the frame's channel order,
    N bools: True where the face was aligned on its own landmarks).

    `landmarks` is (N, 5, 2) in frame pixels in the alignment's layout (`LANDMARK_LAYOUTS`), or
    None (every face then uses the box fallback).
    """
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    out = np.empty((len(boxes), spec.size, spec.size, 3), np.uint8)
    aligned = np.zeros(len(boxes), bool)
    if landmarks is not None and len(landmarks) != len(boxes):
        raise ValueError(f"{len(landmarks)} landmark sets for {len(boxes)} boxes")
    for i, box in enumerate(boxes):
        _check(frame, box)
        if spec.alignment == "box":
            out[i] = crop_face(frame, box, spec.size, spec.scale)
            continue
        points = landmarks[i] if landmarks is not None else None
        aligned[i] = points is not None and landmarks_plausible(
            points, box, LANDMARK_LAYOUTS[spec.alignment])
        out[i] = align_face(frame, points if aligned[i] else box_landmarks(box, spec.alignment),
                            spec.size, spec.alignment)
    return out, aligned

