"""`facewatch export-detector`: ultralytics checkpoint -> ONNX with dynamic batch and metadata.

ultralytics' exporter writes the graph and its own metadata (imgsz, stride, names, task); we add
what the project needs to know about the model: its training data, split and validation metrics,
measured on the exported file itself. A YOLOv8-pose checkpoint with five face landmarks exports
the same way (output [N, 20, anchors]); its file also names the landmark order and their source.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
from pathlib import Path

from facewatch.training.paths import shared_data_dir
from facewatch.training.ultralytics_env import configure_offline

log = logging.getLogger("facewatch.export")
TRAINING_DATA = ("WIDER FACE validation images (1,450, shared copy), split by event class: "
                 "training/splits/widerface_split.json; plus, where `training_sources` says so, "
                 "images labelled by the CenterFace teacher (`facewatch label-faces`) and other "
                 "labelled sources under runs/detector/pseudo/ (models/README.md names each)")
LANDMARK_SOURCE = ("pseudo-labels from dlib's shape_predictor_5_face_landmarks inside each WIDER box "
                   "(faces >= 16 px tall with plausible points): training/widerface_landmarks.py")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", type=Path, required=True, help="ultralytics .pt checkpoint")
    parser.add_argument("--out", type=Path, default=Path("models/face_detector.onnx"),
                        help="ONNX file to write (default: models/face_detector.onnx)")
    parser.add_argument("--imgsz", type=int, default=640, help="default inference size in metadata")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset of the export")
    parser.add_argument("--no-eval", action="store_true", help="skip the validation-split evaluation")


def export_onnx(weights: Path, out: Path, imgsz: int, opset: int) -> Path:
    if not weights.is_file():
        raise FileNotFoundError(f"detector checkpoint not found: {weights}")
    configure_offline()
    from ultralytics import YOLO

    model = YOLO(str(weights))
    kpt_shape = list(getattr(model.model, "kpt_shape", None) or [])
    if len(model.names) != 1 or not (model.task == "detect" or (model.task == "pose"
                                                                and kpt_shape == [5, 3])):
        raise ValueError(f"{weights}: expected a one-class detection checkpoint or a one-class pose "
                         f"checkpoint with kpt_shape [5, 3], got task {model.task!r} with classes "
                         f"{model.names} and kpt_shape {kpt_shape or None}")
    exported = Path(model.export(format="onnx", opset=opset, dynamic=True, simplify=True,
                                 imgsz=imgsz, device="cpu"))
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(exported), out)
    return out


def training_sources(weights: Path) -> dict | None:
    """Images per source and the starting weights, from the run folder the checkpoint lives in
    (`runs/detector/<run>/weights/*.pt` beside `dataset/report.json`), when it is there."""
    report = weights.resolve().parent.parent / "dataset" / "report.json"
    if not report.is_file():
        return None
    data = json.loads(report.read_text())
    sources = {"wider_train_images": data.get("train", {}).get("images"),
               "teacher_labelled_images": data.get("pseudo", {})}
    args = weights.resolve().parent.parent / "args.yaml"
    if args.is_file():
        import yaml

        pretrained = (yaml.safe_load(args.read_text()) or {}).get("pretrained")
        sources["init"] = Path(str(pretrained)).name if pretrained else "random"
    return sources


def run(args: argparse.Namespace) -> int:
    from facewatch.export.onnx_metadata import set_metadata
    from facewatch.stages.face_detector import FaceDetector

    out = export_onnx(args.weights, args.out, args.imgsz, args.opset)
    meta = {"facewatch_detector": "1", "training_data": TRAINING_DATA,
            "checkpoint_sha256": hashlib.sha256(args.weights.read_bytes()).hexdigest()[:16]}
    sources = training_sources(args.weights)
    if sources:
        meta["training_sources"] = sources
    detector = FaceDetector(out, providers=["CPUExecutionProvider"])
    if detector.has_landmarks:
        from facewatch.training.dlib_teacher import FLIP_INDEX, LANDMARK_NAMES

        meta["landmarks"] = {"count": 5, "order": list(LANDMARK_NAMES), "flip_index": list(FLIP_INDEX),
                             "units": "input pixels, (x, y, visibility) rows after the score",
                             "source": LANDMARK_SOURCE}
    if not args.no_eval:
        from facewatch.training.evaluate_detector import EVAL_CONF, evaluate_detector, landmark_labels, select_records

        root = shared_data_dir() / "widerface"
        detector = FaceDetector(out, providers=["CPUExecutionProvider"], conf_threshold=EVAL_CONF)
        labels = landmark_labels(root) if detector.has_landmarks else None
        metrics = evaluate_detector(detector, select_records(root / "wider_face_bbx_gt.txt", "val", None),
                                    root / "images", labels)
        metrics["split"] = "val"
        meta["validation_metrics"] = metrics
        log.info("validation metrics of %s: %s", out, json.dumps(metrics))
    set_metadata(out, meta)
    print(json.dumps({"model": str(out), **{k: v for k, v in meta.items() if k != "training_data"}}))
    return 0
