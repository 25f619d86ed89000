"""`facewatch evaluate-detector`: AP of an ONNX face detector on a WIDER-FACE-format folder.

Prints AP50 over all valid faces, AP50 over faces >= 32 px tall (smaller ones ignored), recall at
precision 0.9 and mean ms per image (batch 1, pre- and post-processing included); the last line
is one JSON object with keys ap50, ap50_large, recall_at_p90, ms_per_image.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import cv2
import numpy as np

from stages.face_detector import FaceDetector
from training.detection_metrics import evaluate
from training.wider_gt import read_wider_gt

LARGE_FACE_PX = 32
# A low threshold traces the whole precision/recall curve; the daemon uses its own, higher one.
EVAL_CONF = 0.01


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="detector ONNX file")
    parser.add_argument("--gt", type=Path, required=True, help="WIDER FACE ground-truth file")
    parser.add_argument("--images", type=Path, required=True, help="folder the GT paths are relative to")
    parser.add_argument("--split", choices=["all", "train", "val"], default="all",
                        help="score only this side of the committed WIDER split (default: every record)")
    parser.add_argument("--imgsz", type=int, default=None, help="inference size (default: model's)")
    parser.add_argument("--limit", type=int, default=None, help="score the first N images only")
    parser.add_argument("--providers", nargs="+", default=["CPUExecutionProvider"])


def evaluate_detector(detector: FaceDetector, records, images_dir: Path) -> dict:
    per_image, seconds, missing = [], 0.0, []
    for record in records:
        frame = cv2.imread(str(images_dir / record.image))
        if frame is None:
            missing.append(record.image)
            continue
        start = time.perf_counter()
        det = detector.detect([frame])[0]
        seconds += time.perf_counter() - start
        per_image.append((det.boxes, det.scores, record.boxes, record.invalid))
    if not per_image:
        raise FileNotFoundError(f"none of the {len(records)} ground-truth images could be read under "
                                f"{images_dir} (first: {records[0].image if records else '-'})")
    everything = evaluate(per_image)
    large = evaluate(per_image, min_height=LARGE_FACE_PX)
    return {"ap50": round(everything["ap50"], 4), "ap50_large": round(large["ap50"], 4),
            "recall_at_p90": round(everything["recall_at_p90"], 4),
            "recall_at_p90_large": round(large["recall_at_p90"], 4),
            "ms_per_image": round(1000 * seconds / len(per_image), 2),
            "images": len(per_image), "unreadable_images": len(missing),
            "faces": everything["faces"], "faces_large": large["faces"]}


def select_records(gt: Path, split: str, limit: int | None):
    records = read_wider_gt(gt)
    if split != "all":
        from training.widerface import load_split

        wanted = set(load_split()[split])
        records = [r for r in records if r.image in wanted]
    return records[:limit] if limit else records


def run(args: argparse.Namespace) -> int:
    if not args.gt.is_file():
        raise FileNotFoundError(f"ground-truth file not found: {args.gt}")
    if not args.images.is_dir():
        raise FileNotFoundError(f"images folder not found: {args.images}")
    detector = FaceDetector(args.model, providers=args.providers, conf_threshold=EVAL_CONF,
                            imgsz=args.imgsz)
    records = select_records(args.gt, args.split, args.limit)
    result = evaluate_detector(detector, records, args.images)
    result["imgsz"] = detector.imgsz
    print(f"images {result['images']}  faces {result['faces']} (>= {LARGE_FACE_PX} px: "
          f"{result['faces_large']})  imgsz {detector.imgsz}  provider {detector.provider}")
    print(f"AP50 all faces           {result['ap50']:.4f}")
    print(f"AP50 faces >= {LARGE_FACE_PX} px       {result['ap50_large']:.4f}")
    print(f"recall at precision 0.9  {result['recall_at_p90']:.4f}")
    print(f"ms per image             {result['ms_per_image']:.2f}")
    print(json.dumps(result))
    return 0
