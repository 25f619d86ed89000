"""Five face landmarks from the detector's box: a small ONNX regressor run on a box crop.

The detector finds faces; this second look at each face (as MTCNN's last stage does) places the
five points that `stages.face_crop` aligns on. It sees a `input_size` square crop of `crop_scale`
times the box's longer side (`face_crop.box_crop_matrix`) and outputs the points as fractions of
that crop, which are mapped back to frame pixels here. Geometry, point order and training data
come from the file's metadata (written by `export/landmarks_onnx.py`).
"""
from __future__ import annotations

import cv2
import numpy as np

from facewatch.stages.face_crop import LANDMARK_LAYOUTS, box_crop_matrix
from facewatch.stages.onnx_session import DEFAULT_PROVIDERS, ModelError, load_session, metadata

NUM_LANDMARKS = 5


class LandmarkModel:
    def __init__(self, model_path, providers=DEFAULT_PROVIDERS, threads: int = 0,
                 layout: str | None = None, spin: bool = False):
        self.path = model_path
        self.session = load_session(model_path, providers, threads, what="landmark model",
                                    spin=spin)
        self.meta = metadata(self.session)
        if "facewatch_landmarks" not in self.meta:
            raise ModelError(f"landmark model {model_path}: no facewatch_landmarks metadata; export "
                             f"it with `facewatch export-landmarks`")
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4 or inputs[0].shape[3] != 3:
            raise ModelError(f"landmark model {model_path}: expected one input [N, S, S, 3], got "
                             f"{[(i.name, i.shape) for i in inputs]}")
        if len(outputs) != 1 or list(outputs[0].shape[1:]) != [2 * NUM_LANDMARKS]:
            raise ModelError(f"landmark model {model_path}: expected one output [N, "
                             f"{2 * NUM_LANDMARKS}] (x, y of {NUM_LANDMARKS} points), got "
                             f"{[(o.name, o.shape) for o in outputs]}")
        self.input_name = inputs[0].name
        self.input_size = int(self.meta.get("input_size", inputs[0].shape[1]))
        self.crop_scale = float(self.meta["crop_scale"])
        # which five points: dlib's (eye corners, nose bottom) or ArcFace's (eye centres, nose tip,
        # mouth corners); files exported before the choice existed place dlib's
        self.layout = str(self.meta.get("landmark_layout", "dlib"))
        if layout is not None and self.layout != layout:
            raise ModelError(f"landmark model {model_path} places {self.layout!r} points, but the "
                             f"embedder aligns on {layout!r} points: use a landmark model trained "
                             f"on that layout (`facewatch train-landmarks --labels ...`)")
        self.provider = self.session.get_providers()[0]

    def crops(self, frame: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The model's input crops (N, S, S, 3) uint8 in the frame's order, and their (N, 2, 3)
        frame -> crop matrices."""
        size = self.input_size
        matrices = np.stack([box_crop_matrix(b, size, self.crop_scale) for b in boxes])
        crops = np.stack([cv2.warpAffine(frame, m, (size, size), flags=cv2.INTER_AREA
                                         if m[0, 0] < 1 else cv2.INTER_LINEAR,
                                         borderMode=cv2.BORDER_REPLICATE) for m in matrices])
        return crops, matrices

    def predict(self, frame: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """(N, 4) boxes of a BGR frame -> (N, 5, 2) float32 landmarks in frame pixels."""
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        if len(boxes) == 0:
            return np.zeros((0, NUM_LANDMARKS, 2), np.float32)
        crops, matrices = self.crops(frame, boxes)
        batch = np.ascontiguousarray(crops[..., ::-1], np.float32)  # the model takes RGB 0..255
        points = self.session.run(None, {self.input_name: batch})[0]
        points = points.reshape(-1, NUM_LANDMARKS, 2) * self.input_size
        # Invert the crop's scale-and-shift (no rotation: box crops are axis-aligned).
        k = matrices[:, 0, 0][:, None, None]
        shift = matrices[:, :, 2][:, None, :]
        return ((points - shift) / k).astype(np.float32)


def landmarks_to_run(crop_alignment: str, path) -> object | None:
    """The landmark model file to run beside the detector: only for an embedder that aligns on
    five points (a box-crop embedder has no use for landmarks), and only when one is configured.
    A file placing the other layout's points is refused here (ModelError), not after the fact."""
    if crop_alignment not in LANDMARK_LAYOUTS or path is None:
        return None
    LandmarkModel(path, ("CPUExecutionProvider",), layout=LANDMARK_LAYOUTS[crop_alignment])
    return path


def landmark_model_from_config(models, crop_alignment: str) -> LandmarkModel | None:
    """The daemon's landmark model from its `models` config section, or None when the embedder
    does not align on five points or none is configured."""
    if crop_alignment not in LANDMARK_LAYOUTS or models.landmarks is None:
        return None
    from facewatch.stages.precision import choose, load

    choice = choose(models, "landmarks")   # fp32 or int8 (models.precision)
    model = load(choice, models.landmarks, lambda path: LandmarkModel(
        path, models.providers, models.threads, layout=LANDMARK_LAYOUTS[crop_alignment],
        spin=models.spin_wait))
    model.choice = choice
    return model
