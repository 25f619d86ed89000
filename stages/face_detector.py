"""The YOLOv8 face detector as the daemon runs it: onnxruntime, letterbox, batch, decode, NMS.

The model is a one-class ultralytics YOLOv8 export: input `images [N, 3, S, S]` (RGB, 0..1),
output `[N, 5, anchors]` rows (cx, cy, w, h, score) in input pixels, or, from a YOLOv8-pose
export with five landmarks, `[N, 20, anchors]`: the same five rows, then (x, y, visibility) of
each landmark (`training.dlib_teacher.LANDMARK_NAMES` order; points in input pixels). Input size,
stride and keypoint shape are read from the file's metadata, so the daemon never duplicates them.

Landmarks come back in frame pixels like the boxes but are not clipped to the frame: a point
just outside it (a face cut by the border) is the model's best estimate, and clipping it would
distort the alignment made from it.
"""
from __future__ import annotations

import logging

import cv2
import numpy as np

from facewatch.stages.detections import Detections
from facewatch.stages.face_landmarks import LandmarkModel
from facewatch.stages.onnx_session import DEFAULT_PROVIDERS, ModelError, load_session, metadata

log = logging.getLogger("facewatch.detector")
NUM_LANDMARKS = 5
BOX_CHANNELS = 5                                  # cx, cy, w, h, score
POSE_CHANNELS = BOX_CHANNELS + 3 * NUM_LANDMARKS  # + (x, y, visibility) per landmark
PAD_VALUE = 114  # ultralytics' letterbox grey: the model was trained on it


def letterbox(frame: np.ndarray, size: int, shape: tuple[int, int] | None = None
              ) -> tuple[np.ndarray, float, tuple[int, int]]:
    """Resize so the longer side fits `size`, keep the aspect ratio, pad (centred) to `shape`
    (height, width; default size x size). Returns the image, the scale and (pad_x, pad_y)."""
    h, w = frame.shape[:2]
    out_h, out_w = shape or (size, size)
    scale = min(size / h, size / w)
    nh, nw = round(h * scale), round(w * scale)
    resized = cv2.resize(frame, (nw, nh), interpolation=cv2.INTER_LINEAR) if (nh, nw) != (h, w) else frame
    pad_x, pad_y = (out_w - nw) / 2, (out_h - nh) / 2
    top, left = round(pad_y - 0.1), round(pad_x - 0.1)
    out = cv2.copyMakeBorder(resized, top, out_h - nh - top, left, out_w - nw - left,
                             cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 3)
    return out, scale, (left, top)


def batch_shape(frames: list[np.ndarray], size: int, stride: int) -> tuple[int, int]:
    """Smallest stride-aligned (h, w) that holds every frame letterboxed to `size`: a 16:9 batch
    at 640 runs at 640x384 instead of 640x640, 40% less work (as ultralytics' rect inference)."""
    h = w = 0
    for frame in frames:
        fh, fw = frame.shape[:2]
        scale = min(size / fh, size / fw)
        h, w = max(h, round(fh * scale)), max(w, round(fw * scale))
    return (-(-h // stride) * stride, -(-w // stride) * stride)


class FaceDetector:
    def __init__(self, model_path, providers=DEFAULT_PROVIDERS, conf_threshold: float = 0.35,
                 iou_threshold: float = 0.5, imgsz: int | None = None, threads: int = 0,
                 max_detections: int = 300, landmarks=None, spin: bool = False):
        self.session = load_session(model_path, providers, threads, what="face detector",
                                    spin=spin)
        # A landmark model (stages.face_landmarks), when given, places every face's five points
        # from its box; it replaces the detector's own keypoints, if the file has any. For
        # one-off callers (enrollment, evaluation); the daemon's detect stage runs it itself on
        # the faces it keeps, so small and untracked detections cost nothing.
        self.landmark_model = (None if landmarks is None
                               else LandmarkModel(landmarks, providers, threads, spin=spin))
        self.meta = metadata(self.session)
        self._check_model(model_path)
        self.input_name = self.session.get_inputs()[0].name
        meta_size = self.meta.get("imgsz")
        self.imgsz = int(imgsz or (meta_size[0] if isinstance(meta_size, (list, tuple)) else meta_size or 640))
        self.stride = int(self.meta.get("stride", 32))
        if self.imgsz % self.stride:
            raise ValueError(f"imgsz must be a multiple of the model stride {self.stride}, got {self.imgsz}")
        self.conf_threshold = conf_threshold
        self.iou_threshold = iou_threshold
        self.max_detections = max_detections
        self.provider = self.session.get_providers()[0]
        # A fixed-shape export only accepts size x size; a dynamic one takes the tighter rectangle.
        self.dynamic_shape = not all(isinstance(d, int) for d in self.session.get_inputs()[0].shape[2:])

    @property
    def gives_landmarks(self) -> bool:
        """Detections carry landmarks: the model's own keypoints or the landmark model's."""
        return self.has_landmarks or self.landmark_model is not None

    def _check_model(self, path) -> None:
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4 or inputs[0].shape[1] != 3:
            raise ModelError(f"face detector {path}: expected one input [N, 3, H, W], got "
                             f"{[(i.name, i.shape) for i in inputs]}")
        shape = outputs[0].shape
        if len(outputs) != 1 or len(shape) != 3 or shape[1] not in (BOX_CHANNELS, POSE_CHANNELS):
            raise ModelError(f"face detector {path}: not a one-class YOLOv8 detector (expected one "
                             f"output [N, {BOX_CHANNELS}, anchors] (boxes) or [N, {POSE_CHANNELS}, "
                             f"anchors] (boxes and {NUM_LANDMARKS} landmarks), got "
                             f"{[(o.name, o.shape) for o in outputs]})")
        self.has_landmarks = shape[1] == POSE_CHANNELS
        task, expected = self.meta.get("task"), ("pose" if self.has_landmarks else "detect")
        if task not in (None, expected):
            raise ModelError(f"face detector {path}: model task is {task!r} with {shape[1]} output "
                             f"channels, expected {expected!r}")
        kpt_shape = self.meta.get("kpt_shape")
        if self.has_landmarks and kpt_shape is not None and list(kpt_shape) != [NUM_LANDMARKS, 3]:
            raise ModelError(f"face detector {path}: keypoint shape {list(kpt_shape)}, expected "
                             f"[{NUM_LANDMARKS}, 3] (five face landmarks with visibility)")

    def preprocess(self, frames: list[np.ndarray]) -> tuple[np.ndarray, list]:
        for i, frame in enumerate(frames):
            if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
                raise ValueError(f"frame {i} must be HxWx3 uint8 BGR, got {frame.shape} {frame.dtype}")
        shape = (batch_shape(frames, self.imgsz, self.stride) if self.dynamic_shape
                 else (self.imgsz, self.imgsz))
        images, geometry = [], []
        for frame in frames:
            own = batch_shape([frame], self.imgsz, self.stride) if self.dynamic_shape else shape
            image, scale, (pad_x, pad_y) = letterbox(frame, self.imgsz, own)
            if own != shape:
                # Grow to the batch's shape by whole strides on the top/left, so the face sits on
                # the same anchor grid as when the frame is inferred alone (same boxes, scores).
                top = self.stride * ((shape[0] - own[0]) // (2 * self.stride))
                left = self.stride * ((shape[1] - own[1]) // (2 * self.stride))
                image = cv2.copyMakeBorder(image, top, shape[0] - own[0] - top, left,
                                           shape[1] - own[1] - left, cv2.BORDER_CONSTANT,
                                           value=(PAD_VALUE,) * 3)
                pad_x, pad_y = pad_x + left, pad_y + top
            images.append(image)
            geometry.append((scale, (pad_x, pad_y), frame.shape[:2]))
        # BGR HWC uint8 -> RGB NCHW float 0..1 in one pass
        batch = cv2.dnn.blobFromImages(images, 1 / 255.0, swapRB=True)
        return batch, geometry

    def decode(self, output: np.ndarray, geometry) -> list[Detections]:
        results = []
        for rows, (scale, (pad_x, pad_y), (h, w)) in zip(output, geometry):
            scores = rows[4]
            keep = scores > self.conf_threshold
            if not np.any(keep):
                empty = Detections.empty()
                if self.has_landmarks:
                    empty = Detections(empty.boxes, empty.scores,
                                       np.zeros((0, NUM_LANDMARKS, 2), np.float32))
                results.append(empty)
                continue
            cx, cy, bw, bh = rows[:4, keep]
            scores = scores[keep]
            boxes = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], axis=1)
            # NMS in input pixels with top-left/width/height as OpenCV expects
            xywh = np.stack([boxes[:, 0], boxes[:, 1], bw, bh], axis=1)
            idx = cv2.dnn.NMSBoxes(xywh.tolist(), scores.tolist(), self.conf_threshold,
                                   self.iou_threshold, top_k=self.max_detections)
            idx = np.asarray(idx, dtype=np.int64).reshape(-1)
            boxes = (boxes[idx] - [pad_x, pad_y, pad_x, pad_y]) / scale
            boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w)
            boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h)
            landmarks = None
            if self.has_landmarks:
                # rows 5.. are x, y, visibility per landmark -> (kept, 5, 3) -> frame pixels
                points = rows[BOX_CHANNELS:, keep][:, idx].T.reshape(-1, NUM_LANDMARKS, 3)[..., :2]
                landmarks = ((points - [pad_x, pad_y]) / scale).astype(np.float32)
            results.append(Detections(boxes.astype(np.float32), scores[idx].astype(np.float32),
                                      landmarks))
        return results

    def detect(self, frames: list[np.ndarray]) -> list[Detections]:
        """Faces in each frame (any sizes, one batched inference)."""
        if not frames:
            return []
        batch, geometry = self.preprocess(frames)
        output = self.session.run(None, {self.input_name: batch})[0]
        results = self.decode(output, geometry)
        if self.landmark_model is not None:
            results = [Detections(d.boxes, d.scores, self.landmark_model.predict(f, d.boxes))
                       for f, d in zip(frames, results)]
        return results


def detector_from_config(models, threads: int | None = None) -> FaceDetector:
    """The detector as the daemon runs it from its `models` config section: thresholds, size,
    threads (`threads` overrides models.threads: the detect stage's lanes). No landmark model
    here: the detect stage runs it only on the faces it crops, after tracking and the size gate
    (`stages.face_landmarks.landmark_model_from_config`)."""
    from facewatch.stages.precision import choose, load

    choice = choose(models, "detector")   # fp32 or int8 (models.precision)
    detector = load(choice, models.detector, lambda path: FaceDetector(
        path, models.providers, models.detector_conf, models.detector_iou, models.detector_imgsz,
        models.threads if threads is None else threads, spin=models.spin_wait))
    detector.choice = choice
    return detector
