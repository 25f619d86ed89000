"""Detector throughput on the CPU at 640 px: our batched onnxruntime path vs ultralytics' predict.

    python -m bench.bench_detector [--model models/face_detector.onnx] [--images 16]

Baselines: ultralytics' own predict loop (one call per image) on the same images, with the
PyTorch checkpoint (`--weights`, what one gets without our export) and with the same ONNX file.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import cv2

from bench.timing import compare
from facewatch.stages.face_detector import FaceDetector
from facewatch.training.paths import shared_data_dir
from facewatch.training.ultralytics_env import configure_offline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("models/face_detector.onnx"))
    parser.add_argument("--weights", type=Path, default=None, help="the .pt the ONNX came from")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()

    from facewatch.training.widerface import load_split

    root = shared_data_dir() / "widerface" / "images"
    frames = [cv2.imread(str(root / rel)) for rel in load_split()["val"][:args.images]]
    ours = FaceDetector(args.model, providers=["CPUExecutionProvider"], imgsz=args.imgsz)
    configure_offline()
    from ultralytics import YOLO

    def ultralytics_loop(model):
        def run():
            for f in frames:
                model.predict(f, imgsz=args.imgsz, conf=ours.conf_threshold, iou=ours.iou_threshold,
                              device="cpu", verbose=False)
        return run

    def batched(size):
        def run():
            for i in range(0, len(frames), size):
                ours.detect(frames[i:i + size])
        return run

    candidates = {"ultralytics_predict_onnx": (ultralytics_loop(YOLO(str(args.model), task="detect")),
                                               len(frames))}
    if args.weights:
        candidates["ultralytics_predict_pt"] = (ultralytics_loop(YOLO(str(args.weights))), len(frames))
    candidates["onnxruntime_batch1"] = (batched(1), len(frames))
    candidates["onnxruntime_batch8"] = (batched(8), len(frames))
    rates = compare(candidates, rounds=args.rounds, seconds=args.seconds)
    base = rates["ultralytics_predict_pt" if args.weights else "ultralytics_predict_onnx"]
    print(json.dumps({"benchmark": "detector_cpu", "imgsz": args.imgsz, "images": len(frames),
                      "cpu_threads": os.cpu_count(), "images_per_s": rates,
                      "baseline": "ultralytics_predict_pt" if args.weights else "ultralytics_predict_onnx",
                      "ratio_vs_baseline": {k: round(v / base, 3) for k, v in rates.items()}}))


if __name__ == "__main__":
    main()
