"""train-detector and export-detector end to end on a tiny real set (seconds, not a real model)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

from facewatch.stages.face_detector import FaceDetector
from facewatch.training.widerface import check_images

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_wider(data_dir, tmp_path_factory):
    """Six real WIDER images (4 train / 2 val) plus one corrupt image and one broken label."""
    src = data_dir / "widerface"
    root = tmp_path_factory.mktemp("wider")
    picked = sorted((src / "images" / "12--Group").glob("*.jpg"))[:6]
    rels = []
    for image in picked:
        rel = f"12--Group/{image.name}"
        for kind, path in (("images", image), ("labels", (src / "labels" / rel).with_suffix(".txt"))):
            dst = root / kind / rel if kind == "images" else (root / "labels" / rel).with_suffix(".txt")
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, dst)
        rels.append(rel)
    (root / "images/12--Group/corrupt.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "labels/12--Group/corrupt.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    shutil.copy(picked[0], root / "images/12--Group/badlabel.jpg")
    (root / "labels/12--Group/badlabel.txt").write_text("0 0.5 banana 0.1\n")
    split = root / "split.json"
    split.write_text(json.dumps({"train": rels[:4] + ["12--Group/corrupt.jpg", "12--Group/badlabel.jpg"],
                                 "val": rels[4:]}))
    return root, split


def test_corrupt_images_and_labels_are_skipped_and_named(tiny_wider):
    root, split = tiny_wider
    checked = check_images(root, json.loads(split.read_text())["train"])
    assert len(checked.good) == 4
    assert checked.skipped == {"12--Group/corrupt.jpg": "image does not decode",
                               "12--Group/badlabel.jpg": "unparsable label (ValueError)"}


def test_missing_data_folder_is_a_clear_error(tmp_path):
    out = subprocess.run([sys.executable, "-m", "facewatch.daemon.cli", "train-detector", "--data",
                          str(tmp_path / "nowhere")], cwd=REPO, capture_output=True, text=True,
                         timeout=120, env={"FACEWATCH_RUNS": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 2
    assert f"WIDER FACE folder not found: {tmp_path / 'nowhere'}" in out.stderr


@pytest.mark.slow
def test_train_one_epoch_then_resume_then_export(tiny_wider, tmp_path):
    root, split = tiny_wider
    env = {"FACEWATCH_RUNS": str(tmp_path / "runs"), "PATH": "/usr/bin:/bin",
           "YOLO_CONFIG_DIR": str(tmp_path / "yolo")}
    common = [sys.executable, "-m", "facewatch.daemon.cli", "train-detector", "--data", str(root), "--split",
              str(split), "--imgsz", "64", "--batch", "4", "--workers", "0", "--name", "tiny"]
    out = subprocess.run(common + ["--epochs", "1"], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "train: 4 images, 2 skipped" in out.stderr
    weights = tmp_path / "runs/detector/tiny/weights"
    assert (weights / "last.pt").is_file() and (weights / "best.pt").is_file()

    # --resume on a finished run is refused by ultralytics; on a missing one we name the path.
    out = subprocess.run(common[:-2] + ["--name", "other", "--resume"], cwd=REPO, capture_output=True,
                         text=True, timeout=120, env=env)
    assert out.returncode == 2 and "no checkpoint at" in out.stderr

    onnx_path = tmp_path / "tiny.onnx"
    out = subprocess.run([sys.executable, "-m", "facewatch.daemon.cli", "export-detector", "--weights",
                          str(weights / "best.pt"), "--out", str(onnx_path), "--imgsz", "64",
                          "--no-eval"], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    detector = FaceDetector(onnx_path, providers=["CPUExecutionProvider"], conf_threshold=0.001)
    assert detector.imgsz == 64 and detector.meta["facewatch_detector"] == 1
    assert detector.meta["names"] == {0: "face"}
    frames = [cv2.imread(str(p)) for p in sorted((root / "images/12--Group").glob("12_*.jpg"))[:3]]
    assert len(detector.detect(frames)) == 3  # dynamic batch axis


def _untrained_box_checkpoint(path):
    """A one-class YOLOv8n box checkpoint as ultralytics saves it (untrained: seconds, not hours)."""
    import yaml

    from facewatch.training.ultralytics_env import configure_offline

    configure_offline()
    from ultralytics import YOLO
    from ultralytics.nn.tasks import yaml_model_load

    cfg = path.parent / "yolov8n-face.yaml"
    spec = yaml_model_load("yolov8n.yaml")
    spec.pop("yaml_file", None)
    cfg.write_text(yaml.safe_dump({**spec, "nc": 1, "scale": "n"}))
    model = YOLO(str(cfg))
    model.save(str(path))
    return path


def test_pose_model_starts_from_the_box_checkpoint(tmp_path):
    import torch

    from facewatch.training.train_detector import pose_model_yaml

    box = _untrained_box_checkpoint(tmp_path / "box.pt")
    from ultralytics import YOLO

    pose = YOLO(str(pose_model_yaml("n", tmp_path)))
    assert pose.task == "pose" and list(pose.model.kpt_shape) == [5, 3]
    pose.load(str(box))
    box_state = torch.load(box, weights_only=False)["model"].float().state_dict()
    pose_state = pose.model.state_dict()
    shared = [k for k in box_state if k in pose_state]
    # everything but the new keypoint branch (model.22.cv4) comes from the box model, head included
    assert len(shared) == len(box_state) and not any(".cv4." in k for k in shared)
    assert all(torch.equal(box_state[k], pose_state[k].float()) for k in shared)
    assert any(".cv4." in k for k in pose_state)


@pytest.mark.slow
def test_train_pose_one_epoch_then_export(tiny_wider, tmp_path):
    pytest.importorskip("dlib")
    root, split = tiny_wider
    box = _untrained_box_checkpoint(tmp_path / "box.pt")
    env = {"FACEWATCH_RUNS": str(tmp_path / "runs"), "PATH": "/usr/bin:/bin",
           "YOLO_CONFIG_DIR": str(tmp_path / "yolo")}
    out = subprocess.run([sys.executable, "-m", "facewatch.daemon.cli", "train-detector", "--pose", "--init",
                          str(box), "--data", str(root), "--split", str(split), "--imgsz", "64",
                          "--batch", "4", "--workers", "0", "--epochs", "1", "--name", "tinypose"],
                         cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "landmark pseudo-labels:" in out.stdout and "faces visible" in out.stdout
    assert "Transferred 355/397 items" in out.stdout + out.stderr
    run = tmp_path / "runs/detector/tinypose"
    assert "kpt_shape: [5, 3]" in (run / "dataset/widerface-pose.yaml").read_text()

    onnx_path = tmp_path / "tinypose.onnx"
    out = subprocess.run([sys.executable, "-m", "facewatch.daemon.cli", "export-detector", "--weights",
                          str(run / "weights/best.pt"), "--out", str(onnx_path), "--imgsz", "64",
                          "--no-eval"], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    detector = FaceDetector(onnx_path, providers=["CPUExecutionProvider"], conf_threshold=0.0001)
    assert detector.has_landmarks and detector.session.get_outputs()[0].shape[1] == 20
    assert detector.meta["kpt_shape"] == [5, 3] and detector.meta["task"] == "pose"
    assert detector.meta["landmarks"]["order"][0] == "right_eye_outer"
    assert detector.meta["landmarks"]["flip_index"] == [2, 3, 0, 1, 4]
    frames = [cv2.imread(str(p)) for p in sorted((root / "images/12--Group").glob("12_*.jpg"))[:2]]
    found = detector.detect(frames)  # dynamic batch axis
    assert len(found) == 2 and all(d.landmarks.shape == (len(d), 5, 2) for d in found)


def test_pack_detector_data_shrinks_images_and_keeps_what_training_reads(tiny_wider, runs, tmp_path):
    """`facewatch pack-detector-data`: resized WebP images, labels unchanged, the same checks and
    pseudo samples as train-detector, and a split file train-detector accepts (GPU hosts)."""
    import numpy as np

    from facewatch.training.widerface import write_dataset_yaml

    root, split = tiny_wider
    few = runs / "detector/pseudo/few"
    for image in sorted((root / "images/12--Group").glob("*.jpg"))[:3]:
        if image.stem in ("corrupt", "badlabel"):
            continue
        (few / "images").mkdir(parents=True, exist_ok=True)
        (few / "labels").mkdir(parents=True, exist_ok=True)
        shutil.copy(image, few / "images" / image.name)
        shutil.copy((root / "labels/12--Group" / image.name).with_suffix(".txt"), few / "labels")
    out = tmp_path / "packed"
    cmd = [sys.executable, "-m", "facewatch.daemon.cli", "pack-detector-data", str(out), "--data", str(root),
           "--split", str(split), "--pseudo", "few:1", "--max-side", "320", "--val-every", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert (report["train"], report["val"], report["pseudo"]) == (4, 1, {"few": 1})
    assert set(report["skipped"]) == {"12--Group/corrupt.jpg", "12--Group/badlabel.jpg"}
    packed = json.loads((out / "split.json").read_text())
    assert len(packed["train"]) == 4 and all(rel.endswith(".webp") for rel in packed["train"])
    for rel in packed["train"] + packed["val"]:
        image = cv2.imread(str(out / "widerface/images" / rel))
        original = cv2.imread(str((root / "images" / rel).with_suffix(".jpg")))
        assert max(image.shape[:2]) == min(320, max(original.shape[:2]))
        assert abs(image.shape[1] / image.shape[0] - original.shape[1] / original.shape[0]) < 0.01
        label = (out / "widerface/labels" / rel).with_suffix(".txt")
        assert np.array_equal(np.loadtxt(label, ndmin=2),
                              np.loadtxt((root / "labels" / rel).with_suffix(".txt"), ndmin=2))
    assert len(list((out / "runs/detector/pseudo/few/images").glob("*.webp"))) == 1
    _, dataset = write_dataset_yaml(out / "widerface", tmp_path / "dataset", out / "split.json")
    assert dataset["train"] == {"images": 4, "skipped": 0, "skipped_reasons": {}}
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert again.returncode != 0 and "is not empty: pack into a new folder" in again.stderr


def test_evaluate_detector_skips_named_events(tmp_path):
    from facewatch.training.evaluate_detector import select_records

    gt = tmp_path / "gt.txt"
    gt.write_text("2--Demonstration/a.jpg\n1\n10 10 40 40 0 0 0 0 0 0\n"
                  "12--Group/b.jpg\n1\n10 10 40 40 0 0 0 0 0 0\n")
    assert [r.image for r in select_records(gt, "all", None, ["2--Demonstration"])] == ["12--Group/b.jpg"]
    with pytest.raises(ValueError, match="--skip-event 3--Riot: no such event folder"):
        select_records(gt, "all", None, ["3--Riot"])
