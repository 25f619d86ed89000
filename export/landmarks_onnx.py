"""Export a landmark checkpoint (`.keras`) to the ONNX file the daemon runs, with its metadata.

    facewatch export-landmarks --model runs/landmarks_model/<run>/best.keras \
        --out models/face_landmarks.onnx [--summary runs/landmarks_model/<run>/summary.json]

Like the embedder export: tf2onnx, opset 17, dynamic batch, refused (exit 1, --out untouched)
when onnxruntime and Keras differ by more than 1e-4 on real crops.
"""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from facewatch.export.keras_onnx import OPSET, ExportError, convert, save_verified

log = logging.getLogger("facewatch.export_landmarks")

MAX_ABS_DIFF = 1e-4
# dlib's 5-point order, which labelled the training faces (training.dlib_teacher.LANDMARK_NAMES).
POINT_ORDER = ["right_eye_outer", "right_eye_inner", "left_eye_outer", "left_eye_inner", "nose_bottom"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="landmark .keras checkpoint")
    parser.add_argument("--out", type=Path, default=Path("models/face_landmarks.onnx"),
                        help="ONNX file to write (default: models/face_landmarks.onnx)")
    parser.add_argument("--summary", type=Path, default=None,
                        help="training summary.json (default: beside --model)")


def run(args: argparse.Namespace) -> int:
    summary_path = args.summary or args.model.parent / "summary.json"
    if not summary_path.is_file():
        raise FileNotFoundError(f"training summary not found: {summary_path} (it holds the crop "
                                f"geometry the model was trained on)")
    try:
        report = export_landmarks(args.model, args.out, json.loads(summary_path.read_text()))
    except ExportError as exc:
        log.error("%s", exc)
        return 1
    print(json.dumps(report))
    return 0


def sample_crops(size: int, scale: float, count: int = 8) -> np.ndarray:
    """Real LFW box crops (RGB float32) when the data is here, else smooth random images."""
    import cv2

    from facewatch.stages.face_crop import crop_face
    from facewatch.training.embedder_data import centre_box, read_image
    from facewatch.training.lfw import default_images_dir

    paths = sorted(default_images_dir().glob("*/*_0001.jpg"))[::400][:count]
    if paths:
        crops = [crop_face(f, centre_box(f.shape), size, scale)[..., ::-1]
                 for f in (read_image(p) for p in paths)]
        return np.stack(crops).astype(np.float32)
    small = np.random.default_rng(0).uniform(0, 255, (count, 8, 8, 3)).astype(np.float32)
    return np.stack([cv2.resize(s, (size, size)) for s in small])


def export_landmarks(model_path: Path, out: Path, summary: dict) -> dict:
    import keras

    if not Path(model_path).is_file():
        raise FileNotFoundError(f"landmark checkpoint not found: {model_path}")
    model = keras.models.load_model(model_path, compile=False)
    size = int(model.input_shape[1])
    if model.output.shape[-1] != 10 or int(summary.get("input_size", size)) != size:
        raise ValueError(f"{model_path} is not a landmark model for {summary.get('input_size')} px "
                         f"crops (input {model.input_shape}, output {model.output.shape})")
    proto = convert(model, size, "points")
    meta = {
        "facewatch_landmarks": "1",
        "input_size": size,
        "crop_scale": float(summary["crop_scale"]),
        "input": "float32 NHWC RGB 0..255, the square box crop stages.face_crop.box_crop_matrix",
        "output": "(N, 10): x, y of five points as fractions of the crop side",
        # Models trained before `train-landmarks --labels` existed are dlib's layout.
        "landmark_layout": summary.get("landmark_layout", "dlib"),
        "point_order": summary.get("point_order", POINT_ORDER),
        "training_data": summary.get("data", {}),
        "metrics": {"val": summary.get("val"), "val_box_prior": summary.get("val_box_prior")},
    }
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    proto.producer_name = "facewatch export-landmarks"
    inputs = sample_crops(size, float(summary["crop_scale"]))
    diff = save_verified(proto, Path(out), model, [inputs, inputs[:1]], MAX_ABS_DIFF)
    return {"onnx": str(out), "max_abs_diff": diff, "opset": OPSET, "bytes": Path(out).stat().st_size}
