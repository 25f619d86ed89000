"""The five-landmark (YOLOv8-pose) detector: onnxruntime decode vs ultralytics' own predict on the
same exported file, batch vs single frame, and refusals of outputs that are neither model kind."""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from facewatch.stages.face_detector import FaceDetector
from facewatch.stages.onnx_session import ModelError
from facewatch.training.detection_metrics import iou_matrix

REPO = Path(__file__).resolve().parent.parent
MODELS = Path(os.environ.get("FACEWATCH_MODELS", REPO / "models"))
POSE_MODEL = MODELS / "face_detector_pose.onnx"
BOX_MODEL = MODELS / "face_detector.onnx"
needs_pose = pytest.mark.skipif(not POSE_MODEL.is_file(), reason=f"{POSE_MODEL} not built yet")


@pytest.fixture(scope="module")
def wider_images(wider_val_images):
    return wider_val_images[:10]


@needs_pose
def test_landmarks_match_ultralytics_predict(wider_images):
    from facewatch.training.ultralytics_env import configure_offline

    configure_offline()
    from ultralytics import YOLO

    conf, iou = 0.25, 0.5
    ours = FaceDetector(POSE_MODEL, providers=["CPUExecutionProvider"], conf_threshold=conf,
                        iou_threshold=iou)
    assert ours.has_landmarks
    theirs = YOLO(str(POSE_MODEL), task="pose")
    compared = 0
    for path in wider_images:
        frame = cv2.resize(cv2.imread(str(path)), (640, 480))  # 4:3: both map back exactly
        mine = ours.detect([frame])[0]
        ref = theirs.predict(frame, imgsz=ours.imgsz, conf=conf, iou=iou, device="cpu", verbose=False)[0]
        ref_boxes, ref_points = ref.boxes.xyxy.numpy(), ref.keypoints.data.numpy()[..., :2]
        assert len(mine) == len(ref_boxes), f"{path.name}: {len(mine)} faces vs ultralytics {len(ref_boxes)}"
        assert mine.landmarks is not None and mine.landmarks.shape == (len(mine), 5, 2)
        if len(mine) == 0:
            continue
        ious = iou_matrix(mine.boxes, ref_boxes)
        assert np.all(ious.max(axis=1) >= 0.95), f"{path.name}: IoU {ious.max(axis=1).min():.3f}"
        # ultralytics clips keypoints to the frame; we do not (see stages/face_detector.py)
        ours_clipped = np.clip(mine.landmarks, 0, [640, 480])
        error = np.abs(ours_clipped - ref_points[ious.argmax(axis=1)]).max()
        assert error <= 0.5, f"{path.name}: landmarks differ by {error:.2f} px"
        compared += len(mine)
    assert compared >= 10, "too few faces found to compare: is the model trained?"


@needs_pose
def test_batched_landmarks_equal_single(wider_images):
    det = FaceDetector(POSE_MODEL, providers=["CPUExecutionProvider"], conf_threshold=0.2)
    frames = [cv2.imread(str(p)) for p in wider_images[1:4]]
    frames.append(cv2.resize(frames[0], (1920, 1080)))  # other size and aspect ratio in one batch
    compared = 0
    for frame, got in zip(frames, det.detect(frames)):
        single = det.detect([frame])[0]
        assert got.landmarks.shape == (len(got), 5, 2)
        # Padding to the batch's shape moves scores a little: a face near the threshold may
        # appear on one side only, so compare the confident ones, each with its counterpart.
        sure = single[single.scores >= 0.4]
        if not len(sure):
            continue
        ious = iou_matrix(sure.boxes, got.boxes)
        assert ious.max(axis=1).min() >= 0.95, "a confident face is missing from the batch"
        # same points within 2% of the face's size
        size = (sure.boxes[:, 2:] - sure.boxes[:, :2]).max(axis=1)
        error = np.abs(sure.landmarks - got.landmarks[ious.argmax(axis=1)]).max(axis=(1, 2))
        assert np.all(error <= 0.02 * size + 0.5), f"landmarks moved by {error.max():.2f} px in a batch"
        compared += len(sure)
    assert compared >= 5


@needs_pose
def test_landmarks_sit_in_their_boxes(wider_images):
    det = FaceDetector(POSE_MODEL, providers=["CPUExecutionProvider"], conf_threshold=0.5)
    for path in wider_images[1:4]:
        found = det.detect([cv2.imread(str(path))])[0]
        if not len(found):
            continue
        # every point within the box grown by half its size: frame pixels, not input pixels
        x1, y1, x2, y2 = (found.boxes[:, i, None] for i in range(4))
        w, h = x2 - x1, y2 - y1
        xs, ys = found.landmarks[..., 0], found.landmarks[..., 1]
        assert np.all((xs >= x1 - w / 2) & (xs <= x2 + w / 2) & (ys >= y1 - h / 2) & (ys <= y2 + h / 2))


@pytest.mark.skipif(not BOX_MODEL.is_file(), reason=f"{BOX_MODEL} not built yet")
def test_box_only_model_gives_no_landmarks(wider_images):
    det = FaceDetector(BOX_MODEL, providers=["CPUExecutionProvider"], conf_threshold=0.3)
    assert not det.has_landmarks
    assert all(d.landmarks is None for d in det.detect([cv2.imread(str(wider_images[1]))]))


def _graph(path: Path, channels: int, metadata: dict | None = None) -> Path:
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, 64, 64])
    y = helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["N", channels, "anchors"])
    shape = helper.make_tensor("shape", TensorProto.INT64, [3], [-1, channels, 1])
    slice_ = [helper.make_tensor(n, TensorProto.INT64, [1], [v])
              for n, v in (("starts", 0), ("ends", channels), ("axes", 1))]
    nodes = [helper.make_node("Slice", ["images", "starts", "ends", "axes"], ["flat"]),
             helper.make_node("Reshape", ["flat", "shape"], ["output0"])]
    x_flat = helper.make_node("Flatten", ["images"], ["f"], axis=1)
    nodes[0].input[0] = "f"
    graph = helper.make_graph([x_flat, *nodes], "wrong", [x], [y], [shape, *slice_])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    for key, value in (metadata or {}).items():
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("channels, metadata, message", [
    (56, {}, "not a one-class YOLOv8 detector"),                       # 17-keypoint person pose
    (23, {}, "not a one-class YOLOv8 detector"),                       # 6 landmarks
    (20, {"task": "detect"}, "model task is 'detect' with 20 output channels, expected 'pose'"),
    (5, {"task": "pose"}, "model task is 'pose' with 5 output channels, expected 'detect'"),
])
def test_wrong_channel_count_is_refused(tmp_path, channels, metadata, message):
    path = _graph(tmp_path / f"wrong{channels}.onnx", channels, metadata)
    with pytest.raises(ModelError, match=message):
        FaceDetector(path)


def test_a_bare_twenty_channel_graph_runs_as_a_landmark_model(tmp_path):
    """The decode itself on a real (tiny) graph: channels are x, y, visibility per landmark."""
    det = FaceDetector(_graph(tmp_path / "pose.onnx", 20), providers=["CPUExecutionProvider"],
                       conf_threshold=0.5, imgsz=64)
    assert det.has_landmarks
    frame = np.zeros((64, 64, 3), np.uint8)
    # the graph passes the first 20 input values of channel R (row 0) through as one anchor
    row = np.array([32, 30, 20, 24, 255, 20, 25, 0, 27, 25, 0, 37, 25, 0, 43, 25, 0, 30, 40, 0], np.uint8)
    frame[0, :20, 2] = row  # BGR frame: R is channel 2
    found = det.detect([frame])[0]
    assert len(found) == 1
    np.testing.assert_allclose(found.boxes[0], [22 / 255, 18 / 255, 42 / 255, 42 / 255], atol=1e-5)
    np.testing.assert_allclose(found.landmarks[0], row[5:].reshape(5, 3)[:, :2] / 255, atol=1e-5)
