"""The five-point landmark model: training geometry, a real short train/export run, the committed
model against dlib on validation people and under head roll, and refusals of wrong files."""
from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from facewatch.stages.face_crop import box_landmarks
from facewatch.stages.face_landmarks import LandmarkModel, landmarks_to_run
from facewatch.stages.onnx_session import ModelError
from facewatch.training.landmark_data import (FLIP_INDEX, augment_geometry, augment_pixels, context_patches,
                                    runtime_crops)
from facewatch.training.landmark_metrics import landmark_nme
from facewatch.training.lfw import default_images_dir, image_path, list_people, load_split

from conftest import landmark_alignment

REPO = Path(__file__).resolve().parent.parent
MODELS = Path(os.environ.get("FACEWATCH_MODELS", REPO / "models"))
LANDMARKS = MODELS / "face_landmarks.onnx"
DETECTOR = MODELS / "face_detector.onnx"
LFW = default_images_dir()
needs_model = pytest.mark.skipif(not (LANDMARKS.is_file() and DETECTOR.is_file() and LFW.is_dir()),
                                 reason="models/face_landmarks.onnx, the detector or LFW missing")

# A frontal face in a 100 px box at (100, 100), dlib's order (image-right eye first), nose below.
FACE_BOX = np.array([100, 100, 200, 200], np.float32)
FACE = np.array([[178, 140], [162, 141], [122, 141], [138, 141], [150, 165]], np.float32)


COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255)]


def _dots(points: np.ndarray, shape=(300, 300)) -> np.ndarray:
    """A frame with one coloured dot per landmark, so each point can be found again after a warp."""
    frame = np.zeros((*shape, 3), np.uint8)
    for (x, y), colour in zip(points, COLOURS):
        cv2.circle(frame, (int(round(x)), int(round(y))), 3, colour, -1)
    return frame


def _found(crop: np.ndarray, colour) -> np.ndarray:
    ys, xs = np.nonzero(np.all(np.abs(crop.astype(int) - colour) < 80, axis=2))
    return np.array([xs.mean(), ys.mean()])


def test_augmented_targets_follow_the_pixels():
    """Jitter, roll and mirror move the target points exactly as they move the image: each dot is
    found where its target says (mirrored crops carry the other eye's colours)."""
    faces = context_patches(_dots(FACE), FACE_BOX[None], FACE[None], "test")
    rng = np.random.default_rng(0)
    mirrored_crops = 0
    for _ in range(40):
        crop, target = augment_geometry(faces.patches[0], faces.boxes[0], faces.points[0], 64, 1.3, rng)
        points = target.reshape(5, 2) * 64
        # mirrored: the dot drawn on the image-right eye is now on the left (the target order
        # stays image-right first, so the points themselves cannot tell)
        mirrored = _found(crop, COLOURS[0])[0] < _found(crop, COLOURS[2])[0]
        mirrored_crops += int(mirrored)
        for i in range(5):
            got = _found(crop, COLOURS[FLIP_INDEX[i] if mirrored else i])
            assert np.linalg.norm(got - points[i]) < 2.0, (i, got, points[i])
    assert 5 < mirrored_crops < 35   # both branches were exercised


def test_pixel_augmentation_keeps_shape_and_type():
    crop = _dots(FACE, (64, 64))
    out = augment_pixels(crop, np.random.default_rng(0))
    assert out.shape == crop.shape and out.dtype == np.uint8


def test_runtime_crop_targets_match_the_daemons_crop():
    faces = context_patches(_dots(FACE), FACE_BOX[None], FACE[None], "test")
    crops, targets = runtime_crops(faces, 64, 1.3)
    for i in range(5):
        assert np.linalg.norm(_found(crops[0], COLOURS[i]) - targets[0].reshape(5, 2)[i] * 64) < 1.5


def test_only_an_aligning_embedder_runs_the_landmark_model(tmp_path):
    meta = {"facewatch_landmarks": "1", "input_size": 64, "crop_scale": 2.0}
    dlib_points = _graph(tmp_path / "dlib.onnx", 10, meta)  # no layout: files before it were dlib's
    arcface_points = _graph(tmp_path / "arcface.onnx", 10, {**meta, "landmark_layout": "arcface"})
    assert landmarks_to_run("five_point", dlib_points) == dlib_points
    assert landmarks_to_run("arcface_five_point", arcface_points) == arcface_points
    assert landmarks_to_run("box", Path("m.onnx")) is None
    assert landmarks_to_run("five_point", None) is None
    # points of the other layout would align every face wrongly: refused, both layouts named
    with pytest.raises(ModelError, match="places 'dlib' points, but the embedder aligns on 'arcface'"):
        landmarks_to_run("arcface_five_point", dlib_points)
    with pytest.raises(ModelError, match="places 'arcface' points, but the embedder aligns on 'dlib'"):
        landmarks_to_run("five_point", arcface_points)


def _graph(path: Path, outputs: int, metadata: dict) -> Path:
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 64, 64, 3])
    y = helper.make_tensor_value_info("points", TensorProto.FLOAT, ["N", outputs])
    shape = helper.make_node("Constant", [], ["s"], value=helper.make_tensor(
        "s", TensorProto.INT64, [2], [-1, 64 * 64 * 3]))
    flat = helper.make_node("Reshape", ["image", "s"], ["flat"])
    starts = helper.make_node("Constant", [], ["b"], value=helper.make_tensor("b", TensorProto.INT64, [1], [0]))
    ends = helper.make_node("Constant", [], ["e"], value=helper.make_tensor("e", TensorProto.INT64, [1], [outputs]))
    axes = helper.make_node("Constant", [], ["a"], value=helper.make_tensor("a", TensorProto.INT64, [1], [1]))
    cut = helper.make_node("Slice", ["flat", "b", "e", "a"], ["points"])
    model = helper.make_model(helper.make_graph([shape, flat, starts, ends, axes, cut], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    for key, value in metadata.items():
        prop = model.metadata_props.add()
        prop.key, prop.value = key, json.dumps(value)
    onnx.save(model, str(path))
    return path


def test_points_map_back_to_frame_pixels(tmp_path):
    """A graph that echoes its first ten input values as the points: scale and shift of the
    crop-to-frame inverse are checked exactly."""
    meta = {"facewatch_landmarks": "1", "input_size": 64, "crop_scale": 2.0}
    model = LandmarkModel(_graph(tmp_path / "echo.onnx", 10, meta), ["CPUExecutionProvider"])
    box = np.array([100, 120, 200, 200], np.float32)   # centre (150, 160); crop side 200 frame px
    for value, want in ((0, (50, 60)), (1, (250, 260))):
        # every pixel `value`: each point sits at value * 64 crop px = value * 200 frame px
        frame = np.full((400, 400, 3), value, np.uint8)
        got = model.predict(frame, box[None])
        assert got.shape == (1, 5, 2)
        np.testing.assert_allclose(got[0], np.repeat([want], 5, axis=0), atol=1e-3)
    assert model.predict(frame, np.zeros((0, 4))).shape == (0, 5, 2)


@pytest.mark.parametrize("outputs, metadata, message", [
    (10, {}, "no facewatch_landmarks metadata"),
    (8, {"facewatch_landmarks": "1", "crop_scale": 1.3}, r"expected one output \[N, 10\]"),
])
def test_wrong_files_are_refused(tmp_path, outputs, metadata, message):
    with pytest.raises(ModelError, match=message):
        LandmarkModel(_graph(tmp_path / "bad.onnx", outputs, metadata), ["CPUExecutionProvider"])


def test_a_missing_file_names_itself(tmp_path):
    with pytest.raises(ModelError, match="landmark model file not found"):
        LandmarkModel(tmp_path / "nope.onnx")


# --- the committed model ----------------------------------------------------------------------

def committed_alignment() -> str:
    return landmark_alignment(LANDMARKS)


@pytest.fixture(scope="module")
def val_faces():
    """Validation people's photos, our detector's boxes (the landmark model's input) and the
    teacher's points inside them in the committed model's layout (the labels), as training made
    them: dlib's five for a `dlib` model, YuNet's five for an `arcface` one."""
    from facewatch.stages.face_detector import FaceDetector

    if committed_alignment() == "five_point":
        dlib_teacher = pytest.importorskip("facewatch.training.dlib_teacher")
        pytest.importorskip("dlib", reason="the teacher extra (dlib-bin) is not installed")
        teacher = dlib_teacher.DlibTeacher(embeddings=False)
        label = lambda frame, box: teacher.landmarks(frame[..., ::-1], box[None])[0]  # noqa: E731
    else:
        from facewatch.training.sface_teacher import SFaceTeacher

        yunet = SFaceTeacher(embeddings=False)
        found = lambda frame, box: yunet.face_in_box(frame, box)  # noqa: E731
        label = lambda frame, box: None if found(frame, box) is None else found(frame, box)[1]  # noqa: E731
    people = list_people(LFW)
    names = sorted(load_split(LFW)["val_people"])[::6][:30]
    frames = [cv2.imread(str(image_path(LFW, n, people[n][0]))) for n in names]
    detector = FaceDetector(DETECTOR, ["CPUExecutionProvider"], imgsz=160)
    out = []
    for frame in frames:
        det = detector.detect([frame])[0]
        if len(det) == 0:
            continue
        box = det.boxes[np.argmax(det.scores)]
        points = label(frame, box)
        if points is not None:
            out.append((frame, box, np.asarray(points, np.float32).reshape(5, 2)))
    assert len(out) >= 25
    return out


@needs_model
def test_committed_model_beats_the_box_prior_on_validation_people(val_faces):
    model = LandmarkModel(LANDMARKS, ["CPUExecutionProvider"])
    predicted = np.stack([model.predict(f, b[None])[0] for f, b, _ in val_faces])
    labels = np.stack([p for _, _, p in val_faces])
    prior = np.stack([box_landmarks(b) for _, b, _ in val_faces])
    ours, fallback = landmark_nme(predicted, labels), landmark_nme(prior, labels)
    assert np.median(ours) < 0.10, np.median(ours)
    assert ours.mean() < 0.7 * fallback.mean(), (ours.mean(), fallback.mean())


def _eye_angle(points: np.ndarray) -> float:
    """Angle of the line from the image-left eye to the image-right eye (dlib: two corners each,
    image-right eye first; ArcFace: the image-left eye's centre, then the image-right one's)."""
    if committed_alignment() == "five_point":
        axis = points[0:2].mean(axis=0) - points[2:4].mean(axis=0)
    else:
        axis = points[1] - points[0]
    return float(np.degrees(np.arctan2(axis[1], axis[0])))


@needs_model
def test_committed_model_follows_head_roll(val_faces):
    """Rolled faces (the frame rotated by +-20 degrees): the predicted eye line turns with them.
    The box prior, which knows only the box, stays level; alignment needs this."""
    from facewatch.stages.face_detector import FaceDetector

    model = LandmarkModel(LANDMARKS, ["CPUExecutionProvider"])
    detector = FaceDetector(DETECTOR, ["CPUExecutionProvider"], imgsz=160)
    errors = []
    for frame, _, label in val_faces[:12]:
        for degrees in (-20, 20):
            h, w = frame.shape[:2]
            rotation = cv2.getRotationMatrix2D((w / 2, h / 2), degrees, 1.0)
            rolled = cv2.warpAffine(frame, rotation, (w, h), borderMode=cv2.BORDER_REPLICATE)
            det = detector.detect([rolled])[0]
            if len(det) == 0:
                continue
            box = det.boxes[np.argmax(det.scores)]
            want = _eye_angle(label) - degrees   # image y points down: positive angles turn up
            errors.append(abs(_eye_angle(model.predict(rolled, box[None])[0]) - want))
    assert len(errors) >= 18
    assert np.median(errors) < 6.0, np.round(errors, 1)


# --- a real short run: train, export, run ---------------------------------------------------

@pytest.mark.skipif(not LFW.is_dir(), reason=f"LFW images not found at {LFW}")
def test_train_export_and_run(tmp_path, monkeypatch, data_dir):
    """`train-landmarks` on a few people and WIDER images (dlib labels computed on the way),
    `export-landmarks` (refused unless onnxruntime reproduces Keras), then the daemon's loader."""
    pytest.importorskip("dlib", reason="the teacher extra (dlib-bin) is not installed")
    from facewatch.daemon.cli import main

    monkeypatch.setenv("FACEWATCH_RUNS", str(tmp_path / "runs"))
    code = main(["train-landmarks", "--max-people", "6", "--max-wider-images", "6", "--epochs", "2",
                 "--batch", "8", "--out", "tiny"])
    assert code == 0
    run = tmp_path / "runs" / "landmarks_model" / "tiny"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["data"]["train_lfw"] > 0 and summary["data"]["val_lfw"] > 0
    assert summary["data"]["train_wider"] > 0
    assert len(summary["history"]) == 2 and summary["val"]["lfw"]["nme"] is not None
    out = tmp_path / "face_landmarks.onnx"
    assert main(["export-landmarks", "--model", str(run / "best.keras"), "--out", str(out)]) == 0
    model = LandmarkModel(out, ["CPUExecutionProvider"])
    assert model.input_size == 64 and model.crop_scale == pytest.approx(1.3)
    frame = cv2.imread(str(next(LFW.glob("*/*_0001.jpg"))))
    points = model.predict(frame, np.array([[70, 60, 180, 190]], np.float32))
    assert points.shape == (1, 5, 2) and np.isfinite(points).all()


@needs_model
def test_the_daemon_loads_the_configured_model_only_for_aligning_embedders(tmp_path, val_faces):
    """`models.landmarks` in a real config file, relative to it; the landmark model the daemon
    builds from it places points near dlib's on the daemon detector's boxes for a five-point
    embedder, and nothing is loaded for a box-crop one."""
    from facewatch.daemon.config import load_config
    from facewatch.stages.face_detector import detector_from_config
    from facewatch.stages.face_landmarks import landmark_model_from_config

    (tmp_path / "m").symlink_to(MODELS.resolve(), target_is_directory=True)
    config = tmp_path / "config.yaml"
    config.write_text("cameras: [{name: cam, uri: /dev/null}]\n"
                      "models: {detector: m/face_detector.onnx, embedder: m/face_embedder.onnx, "
                      "landmarks: m/face_landmarks.onnx, detector_imgsz: 160, "
                      "providers: [CPUExecutionProvider]}\n")
    models = load_config(config).models
    assert models.landmarks == (tmp_path / "m" / "face_landmarks.onnx").resolve()
    assert landmark_model_from_config(models, "box") is None
    detector = detector_from_config(models)
    marker = landmark_model_from_config(models, committed_alignment())
    nme = []
    for frame, _, label in val_faces[:10]:
        det = detector.detect([frame])[0]
        landmarks = marker.predict(frame, det.boxes)
        assert landmarks.shape == (len(det), 5, 2)
        nme.append(landmark_nme(landmarks[np.argmax(det.scores)][None], label[None])[0])
    assert np.median(nme) < 0.12, nme
