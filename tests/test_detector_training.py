"""train-detector and export-detector end to end on a tiny real set (seconds, not a real model)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

from stages.face_detector import FaceDetector
from training.widerface import check_images

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
    out = subprocess.run([sys.executable, "-m", "daemon.cli", "train-detector", "--data",
                          str(tmp_path / "nowhere")], cwd=REPO, capture_output=True, text=True,
                         timeout=120, env={"FACEWATCH_RUNS": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 2
    assert f"WIDER FACE folder not found: {tmp_path / 'nowhere'}" in out.stderr


@pytest.mark.slow
def test_train_one_epoch_then_resume_then_export(tiny_wider, tmp_path):
    root, split = tiny_wider
    env = {"FACEWATCH_RUNS": str(tmp_path / "runs"), "PATH": "/usr/bin:/bin",
           "YOLO_CONFIG_DIR": str(tmp_path / "yolo")}
    common = [sys.executable, "-m", "daemon.cli", "train-detector", "--data", str(root), "--split",
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
    out = subprocess.run([sys.executable, "-m", "daemon.cli", "export-detector", "--weights",
                          str(weights / "best.pt"), "--out", str(onnx_path), "--imgsz", "64",
                          "--no-eval"], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    detector = FaceDetector(onnx_path, providers=["CPUExecutionProvider"], conf_threshold=0.001)
    assert detector.imgsz == 64 and detector.meta["facewatch_detector"] == 1
    assert detector.meta["names"] == {0: "face"}
    frames = [cv2.imread(str(p)) for p in sorted((root / "images/12--Group").glob("12_*.jpg"))[:3]]
    assert len(detector.detect(frames)) == 3  # dynamic batch axis
