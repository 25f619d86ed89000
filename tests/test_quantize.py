"""int8 copies of the shipped models (`facewatch quantize-model`): they load through the daemon's
own classes, agree with the float models on real validation faces, and an int8 embedder keeps
its parent's embedding space (gallery rows stay comparable)."""
from __future__ import annotations

import subprocess
import sys

import cv2
import numpy as np
import pytest

from conftest import DETECTOR, EMBEDDER, MODELS_DIR, REPO
from facewatch.stages.face_crop import crop_faces
from facewatch.stages.face_detector import FaceDetector
from facewatch.stages.face_embedder import FaceEmbedder
from facewatch.stages.face_landmarks import LandmarkModel

LANDMARKS = MODELS_DIR / "face_landmarks.onnx"


def _quantize(kind: str, model, out, *extra) -> None:
    result = subprocess.run([sys.executable, "-m", "facewatch.daemon.cli", "quantize-model", "--kind", kind,
                             "--model", str(model), "--out", str(out), "--detector", str(DETECTOR),
                             "--landmarks", str(LANDMARKS), *extra], cwd=REPO, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.fixture(scope="module")
def val_faces(data_dir):
    """Validation people's photos (never calibration images) with boxes from the shipped detector."""
    from facewatch.training.photo_check import lfw_val_images

    detector = FaceDetector(DETECTOR, providers=["CPUExecutionProvider"], imgsz=160)
    faces = []
    for path in lfw_val_images()[::40][:20]:
        image = cv2.imread(str(path))
        det = detector.detect([image])[0]
        if len(det):
            faces.append((image, det.boxes[:1]))
    assert len(faces) >= 10
    return faces


def test_int8_landmarks_and_embedder_agree_with_float(val_faces, tmp_path):
    if not (DETECTOR.is_file() and EMBEDDER.is_file() and LANDMARKS.is_file()):
        pytest.skip("shipped models not present")
    _quantize("landmarks", LANDMARKS, tmp_path / "lm.int8.onnx", "--images", "30")
    _quantize("embedder", EMBEDDER, tmp_path / "emb.int8.onnx")

    lm32 = LandmarkModel(LANDMARKS, providers=["CPUExecutionProvider"])
    lm8 = LandmarkModel(tmp_path / "lm.int8.onnx", providers=["CPUExecutionProvider"])
    assert lm8.meta["quantization"]["mode"] == "static QDQ"
    deviation = [np.abs(lm32.predict(i, b) - lm8.predict(i, b)).max() / (b[0, 2] - b[0, 0])
                 for i, b in val_faces]
    assert np.median(deviation) < 0.03 and max(deviation) < 0.08  # fractions of the face's width

    e32 = FaceEmbedder(EMBEDDER, providers=["CPUExecutionProvider"])
    e8 = FaceEmbedder(tmp_path / "emb.int8.onnx", providers=["CPUExecutionProvider"])
    assert e8.meta["quantization"]["mode"] == "dynamic"
    assert e8.model_id == e32.model_id  # gallery rows enrolled with either compare
    crops = np.concatenate([crop_faces(i, b, e32.crop_spec, lm32.predict(i, b))[0] for i, b in val_faces])
    cosine = (e32.embed(crops) * e8.embed(crops)).sum(axis=1)
    assert cosine.min() > 0.995
    # and the int8 copy still tells people apart: its own cross-person cosines stay low
    emb = e8.embed(crops)
    off_diagonal = (emb @ emb.T)[~np.eye(len(emb), dtype=bool)]
    assert np.median(off_diagonal) < 0.5


def test_missing_model_is_named(tmp_path):
    result = subprocess.run([sys.executable, "-m", "facewatch.daemon.cli", "quantize-model", "--kind", "embedder",
                             "--model", str(tmp_path / "nope.onnx")], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode != 0 and "nope.onnx" in result.stderr


def test_unloadable_model_is_named(tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not an onnx file")
    result = subprocess.run([sys.executable, "-m", "facewatch.daemon.cli", "quantize-model", "--kind", "embedder",
                             "--model", str(garbage)], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0 and "garbage.onnx" in result.stderr
    assert "is not a loadable ONNX model" in result.stderr and "Traceback" not in result.stderr

