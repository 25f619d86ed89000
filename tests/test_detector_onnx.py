"""The shipped detector: onnxruntime path vs ultralytics' own predict, and refusals of bad files."""
from __future__ import annotations

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
MODEL = REPO / "models" / "face_detector.onnx"
needs_model = pytest.mark.skipif(not MODEL.is_file(), reason=f"{MODEL} not built yet")


@pytest.fixture(scope="module")
def wider_images(wider_val_images):
    return wider_val_images


@needs_model
def test_onnxruntime_matches_ultralytics_predict(wider_images):
    from facewatch.training.ultralytics_env import configure_offline

    configure_offline()
    from ultralytics import YOLO

    conf, iou = 0.25, 0.5
    ours = FaceDetector(MODEL, providers=["CPUExecutionProvider"], conf_threshold=conf,
                        iou_threshold=iou)
    theirs = YOLO(str(MODEL), task="detect")
    compared = 0
    for path in wider_images:
        # 640x480 frames: ultralytics maps boxes back with a scale recomputed from the rounded
        # letterbox size (off by up to ~1.5 px when h * scale is not a whole number, e.g. 449 px
        # tall images); we keep the exact scale. At 4:3 both are exact, so the models must agree.
        frame = cv2.resize(cv2.imread(str(path)), (640, 480))
        mine = ours.detect([frame])[0]
        ref = theirs.predict(frame, imgsz=ours.imgsz, conf=conf, iou=iou, device="cpu",
                             verbose=False)[0].boxes
        ref_boxes, ref_scores = ref.xyxy.numpy(), ref.conf.numpy()
        assert len(mine) == len(ref_boxes), f"{path.name}: {len(mine)} boxes vs ultralytics {len(ref_boxes)}"
        if len(mine) == 0:
            continue
        ious = iou_matrix(mine.boxes, ref_boxes)
        best = ious.argmax(axis=1)
        assert np.all(ious.max(axis=1) >= 0.95), f"{path.name}: IoU {ious.max(axis=1).min():.3f}"
        assert np.abs(mine.scores - ref_scores[best]).max() <= 0.01
        compared += len(mine)
    assert compared >= 10, "too few faces found to compare: is the model trained?"


@needs_model
def test_batched_equals_single_and_any_frame_size(wider_images):
    det = FaceDetector(MODEL, providers=["CPUExecutionProvider"], conf_threshold=0.3)
    frames = [cv2.imread(str(p)) for p in wider_images[:4]]
    frames.append(cv2.resize(frames[0], (1920, 1080)))  # a 1080p frame, other aspect ratio
    batched = det.detect(frames)
    for frame, got in zip(frames, batched):
        single = det.detect([frame])[0]
        # In a batch a frame may be padded to a larger rectangle than alone; the far padding
        # moves border-sensitive outputs only slightly. The pretrained detector (issue 11) looks
        # further into the padding than the scratch one did: most faces agree to 1e-3, a few
        # low-scoring ones move by up to ~0.07, so one just above the threshold may appear on
        # one side only. Every clear face (>= 0.45) is on both sides, in the same place; its
        # score may move too (epoch 7 of the run: one by 0.12), never by enough to cross the
        # daemon's 0.25 from a clear score.
        assert abs(len(got) - len(single)) <= max(1, len(single) // 10)
        for a, b in ((got, single), (single, got)):
            clear = a.boxes[a.scores >= 0.45]
            if len(clear):
                # a one-pixel move of a face under 32 px costs ~10% IoU (the GPU-trained model
                # finds 14-px faces at >= 0.45: one moved to IoU 0.83); larger faces stay at 0.9
                small = (clear[:, 3] - clear[:, 1]) < 32
                best = iou_matrix(clear, b.boxes).max(axis=1) if len(b) else np.zeros(len(clear))
                assert np.all(best[~small] >= 0.9) and np.all(best[small] >= 0.75)
        if len(got) and len(single):
            ious = iou_matrix(got.boxes, single.boxes)
            matched = ious.max(axis=1) >= 0.9
            assert np.median(ious.max(axis=1)[matched]) >= 0.97   # 0.979 on these small faces (GPU model)
            other = single.scores[ious.argmax(axis=1)]
            score_moves = np.abs(got.scores - other)[matched]
            clear_moves = score_moves[np.maximum(got.scores, other)[matched] >= 0.45]
            assert np.median(score_moves) <= 0.02 and score_moves.max() <= 0.15   # GPU model: 0.012
            assert clear_moves.size == 0 or clear_moves.max() <= 0.15
        h, w = frame.shape[:2]
        assert np.all(got.boxes[:, [0, 2]] <= w) and np.all(got.boxes[:, [1, 3]] <= h)
    scale = 1920 / frames[0].shape[1]  # boxes come back in the big frame's own pixels
    if len(batched[0]) and len(batched[-1]):
        assert iou_matrix(batched[0].boxes * np.array([scale, 1080 / frames[0].shape[0]] * 2),
                          batched[-1].boxes).max() > 0.7


def test_missing_model_is_refused(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        FaceDetector(tmp_path / "nope.onnx")


def test_corrupt_model_is_refused(tmp_path):
    bad = tmp_path / "corrupt.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 100)
    with pytest.raises(ModelError, match="not a loadable ONNX model"):
        FaceDetector(bad)


def test_wrong_kind_of_model_is_refused(tmp_path):
    # An 80-class YOLO-shaped graph: the right input, the wrong output width.
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, 64, 64])
    y = helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["N", 84, 84])
    shape = helper.make_tensor("shape", TensorProto.INT64, [3], [-1, 84, 84])
    graph = helper.make_graph([helper.make_node("Reshape", ["images", "shape"], ["output0"])],
                              "wrong", [x], [y], [shape])
    path = tmp_path / "coco.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(ModelError, match="not a one-class YOLOv8 detector"):
        FaceDetector(path)
