"""`facewatch evaluate-detector`: AP of an ONNX face detector on a WIDER-FACE-format folder.

Prints AP50 over all valid faces, AP50 over faces >= 32 px tall (smaller ones ignored), recall at
precision 0.9 and mean ms per image (batch 1, pre- and post-processing included); the last line
is one JSON object with keys ap50, ap50_large, recall_at_p90, ms_per_image.

For a model with landmarks (YOLOv8-pose export) it also prints the landmark error against the
dlib pseudo-labels of `training/widerface_landmarks.py` (read from the WIDER folder beside
`--images`, computed once and cached): detections are matched one-to-one to the labelled face
boxes (IoU >= 0.5, highest score first), and over matched faces with visible labels it reports
the mean and median NME (mean point error / inter-ocular distance) and the share under 0.1.
For every model, `nme_box_prior` is the same error of the fixed average landmark layout inside
the detected box (`stages.face_crop.box_landmarks`, the fallback when there are no landmarks).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import cv2
import numpy as np

from facewatch.stages.face_detector import FaceDetector
from facewatch.training.detection_metrics import evaluate, recall_by_attribute
from facewatch.training.landmark_metrics import landmark_nme, match_faces, summarise_nme
from facewatch.training.wider_gt import ATTRIBUTES, read_wider_gt

LARGE_FACE_PX = 32
SMALL_FACE_PX = 16  # the small band scored on its own: 16 <= height < 32 px
# A low threshold traces the whole precision/recall curve; the daemon uses its own, higher one.
EVAL_CONF = 0.01
DAEMON_CONF = 0.25   # models.detector_conf's default: the breakdown by attribute at both


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="detector ONNX file")
    parser.add_argument("--gt", type=Path, required=True, help="WIDER FACE ground-truth file")
    parser.add_argument("--images", type=Path, required=True, help="folder the GT paths are relative to")
    parser.add_argument("--split", choices=["all", "train", "val"], default="all",
                        help="score only this side of the committed WIDER split (default: every record)")
    parser.add_argument("--imgsz", type=int, default=None, help="inference size (default: model's)")
    parser.add_argument("--limit", type=int, default=None, help="score the first N images only")
    parser.add_argument("--skip-event", action="append", default=[], metavar="EVENT",
                        help="leave out an event class (e.g. 2--Demonstration: one whose scene type a "
                             "training source also has, so the split's unseen-event rule holds); repeatable")
    parser.add_argument("--providers", nargs="+", default=["CPUExecutionProvider"],
                        help="onnxruntime execution providers, in order of preference")
    parser.add_argument("--landmarks", type=Path, default=None,
                        help="landmark model ONNX run on the detected boxes (replaces the detector's "
                             "own keypoints), as the daemon runs it")
    parser.add_argument("--no-photo-check", action="store_true",
                        help="skip the photo check (LFW validation portraits: exactly one box on the "
                             "central face; needs the LFW folder and the [detector-teachers] extra)")
    parser.add_argument("--photo-conf", type=float, default=None,
                        help="detector confidence for the photo check (default: the daemon's, "
                             "models.detector_conf)")
    parser.add_argument("--no-landmarks", action="store_true",
                        help="skip the landmark error (needs the WIDER labels/ beside --images and dlib)")


def landmark_labels(root: Path):
    """The cached dlib pseudo-labels of the committed split (train and val) under `root`."""
    from facewatch.training.widerface import load_split
    from facewatch.training.widerface_landmarks import load_landmark_labels

    split = load_split()
    return load_landmark_labels(root, split["train"] + split["val"])


def landmark_errors(det, labels, image: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """NME of the model's landmarks and NME of the box prior over this image's matched faces
    with visible labels, those faces' heights, and the heights of all its visible labelled faces."""
    from facewatch.stages.face_crop import box_landmarks

    gt_boxes, gt_points, gt_visible = labels.image(image)
    pairs = [(d, g) for d, g in match_faces(det.boxes, det.scores, gt_boxes) if gt_visible[g]]
    d_idx = np.array([d for d, _ in pairs], np.int64)
    g_idx = np.array([g for _, g in pairs], np.int64)
    target = gt_points[g_idx]
    prior = np.array([box_landmarks(b) for b in det.boxes[d_idx]], np.float32).reshape(-1, 5, 2)
    model = (landmark_nme(det.landmarks[d_idx], target) if det.landmarks is not None
             else np.zeros(0))
    heights = gt_boxes[:, 3] - gt_boxes[:, 1]
    return model, landmark_nme(prior, target), heights[g_idx], heights[gt_visible]


def evaluate_detector(detector: FaceDetector, records, images_dir: Path, labels=None) -> dict:
    """Box AP (and, with `labels` (LandmarkLabels), landmark NME) of `detector` on `records`."""
    per_image, seconds, missing, attributes = [], 0.0, [], []
    nme, nme_prior, matched_heights, labelled_heights = [], [], [], []
    for record in records:
        frame = cv2.imread(str(images_dir / record.image))
        if frame is None:
            missing.append(record.image)
            continue
        start = time.perf_counter()
        det = detector.detect([frame])[0]
        seconds += time.perf_counter() - start
        per_image.append((det.boxes, det.scores, record.boxes, record.invalid))
        if record.attributes is not None:
            attributes.append(record.attributes)
        if labels is not None and record.image in labels:
            model, prior, matched, labelled = landmark_errors(det, labels, record.image)
            nme.append(model)
            nme_prior.append(prior)
            matched_heights.append(matched)
            labelled_heights.append(labelled)
    if not per_image:
        raise FileNotFoundError(f"none of the {len(records)} ground-truth images could be read under "
                                f"{images_dir} (first: {records[0].image if records else '-'})")
    everything = evaluate(per_image)
    large = evaluate(per_image, min_height=LARGE_FACE_PX)
    small = evaluate(per_image, min_height=SMALL_FACE_PX, max_height=LARGE_FACE_PX)
    result = {"ap50": round(everything["ap50"], 4), "ap50_large": round(large["ap50"], 4),
              "ap50_small": round(small["ap50"], 4), "faces_small": small["faces"],
              "recall_at_p90": round(everything["recall_at_p90"], 4),
              "recall_at_p90_large": round(large["recall_at_p90"], 4),
              "ms_per_image": round(1000 * seconds / len(per_image), 2),
              "images": len(per_image), "unreadable_images": len(missing),
              "faces": everything["faces"], "faces_large": large["faces"]}
    if len(attributes) == len(per_image):   # where the large faces it misses are
        with_attributes = [(*p, a) for p, a in zip(per_image, attributes)]
        result["recall_large_by_attribute"] = {
            f"score_{conf}": recall_by_attribute(with_attributes, ATTRIBUTES, conf, LARGE_FACE_PX)
            for conf in (DAEMON_CONF, EVAL_CONF)}
    if labels is not None:
        result.update(landmark_summary(detector.gives_landmarks, nme, nme_prior, matched_heights,
                                       labelled_heights))
    return result


def landmark_summary(has_landmarks: bool, nme, nme_prior, matched_heights, labelled_heights) -> dict:
    """NME figures over all matched faces and over those >= LARGE_FACE_PX tall (`_large`)."""
    join = lambda parts: np.concatenate(parts) if parts else np.zeros(0)  # noqa: E731
    nme, nme_prior, matched, labelled = map(join, (nme, nme_prior, matched_heights, labelled_heights))
    out = {}
    for suffix, keep, total in (("", np.ones(len(matched), bool), len(labelled)),
                                ("_large", matched >= LARGE_FACE_PX, int((labelled >= LARGE_FACE_PX).sum()))):
        prior = summarise_nme(nme_prior[keep], total)
        out[f"nme_box_prior{suffix}"] = prior["nme"]
        out[f"nme_box_prior_under_0_1{suffix}"] = prior["nme_under_0_1"]
        summary = summarise_nme(nme[keep], total) if has_landmarks else {
            "landmark_faces": prior["landmark_faces"], "landmark_faces_labelled": total}
        out.update({f"{k}{suffix}": v for k, v in summary.items()})
    return out


def print_attribute_recall(by_conf: dict) -> None:
    """One line per WIDER attribute value: faces >= 32 px and the share found at each score."""
    confs = list(by_conf)
    print(f"faces >= {LARGE_FACE_PX} px covered by a box (IoU >= 0.5), by WIDER attribute, at "
          + " / ".join(c.replace("score_", "score >= ") for c in confs))
    for name, values in by_conf[confs[0]].items():
        cells = [f"{label} {v['faces']}: " + " / ".join(
            "-" if by_conf[c][name][label]["recall"] is None
            else f"{by_conf[c][name][label]['recall']:.3f}" for c in confs)
            for label, v in values.items()]
        print(f"  {name:<13}" + "   ".join(cells))


def select_records(gt: Path, split: str, limit: int | None, skip_events: list[str] = ()):
    records = read_wider_gt(gt)
    if skip_events:
        known = {r.image.split("/", 1)[0] for r in records}
        unknown = sorted(set(skip_events) - known)
        if unknown:
            raise ValueError(f"--skip-event {', '.join(unknown)}: no such event folder in {gt} "
                             f"(expected names like 2--Demonstration)")
        records = [r for r in records if r.image.split("/", 1)[0] not in skip_events]
    if split != "all":
        from facewatch.training.widerface import load_split

        wanted = set(load_split()[split])
        records = [r for r in records if r.image in wanted]
    return records[:limit] if limit else records


def run_photo_check(args: argparse.Namespace, imgsz: int) -> dict:
    """The photo check at the daemon's confidence (training/photo_check.py)."""
    from facewatch.daemon.config import ModelsConfig
    from facewatch.training.paths import runs_dir
    from facewatch.training.photo_check import lfw_val_images, photo_check

    conf = args.photo_conf if args.photo_conf is not None else ModelsConfig.model_fields["detector_conf"].default
    detector = FaceDetector(args.model, providers=args.providers, conf_threshold=conf, imgsz=imgsz)
    result = photo_check(detector, lfw_val_images(), runs_dir() / "detector" / "photo_check_teacher.json")
    return {**result, "photo_conf": conf}


def run(args: argparse.Namespace) -> int:
    if not args.gt.is_file():
        raise FileNotFoundError(f"ground-truth file not found: {args.gt}")
    if not args.images.is_dir():
        raise FileNotFoundError(f"images folder not found: {args.images}")
    detector = FaceDetector(args.model, providers=args.providers, conf_threshold=EVAL_CONF,
                            imgsz=args.imgsz, landmarks=args.landmarks)
    records = select_records(args.gt, args.split, args.limit, args.skip_event)
    labels = None
    if (args.images.parent / "labels").is_dir() and not args.no_landmarks:
        labels = landmark_labels(args.images.parent)
    result = evaluate_detector(detector, records, args.images, labels)
    result["imgsz"] = detector.imgsz
    if not args.no_photo_check:
        result.update(run_photo_check(args, detector.imgsz))
    print(f"images {result['images']}  faces {result['faces']} (>= {LARGE_FACE_PX} px: "
          f"{result['faces_large']})  imgsz {detector.imgsz}  provider {detector.provider}")
    print(f"AP50 all faces           {result['ap50']:.4f}")
    print(f"AP50 faces >= {LARGE_FACE_PX} px       {result['ap50_large']:.4f}")
    print(f"AP50 faces {SMALL_FACE_PX}-{LARGE_FACE_PX} px        {result['ap50_small']:.4f}")
    print(f"recall at precision 0.9  {result['recall_at_p90']:.4f}")
    print(f"ms per image             {result['ms_per_image']:.2f}")
    if "recall_large_by_attribute" in result:
        print_attribute_recall(result["recall_large_by_attribute"])
    if "photo_check" in result:
        print(f"photo check              {result['photo_check']:.4f} ({result['photos']} LFW validation "
              f"photos: {result['photos_missed']} missed, {result['photos_duplicated']} with two boxes "
              f"on the face; conf {result['photo_conf']})")
    if labels is not None:
        for suffix, band in (("", "all faces"), ("_large", f"faces >= {LARGE_FACE_PX} px")):
            print(f"landmarks, {band}: {result['landmark_faces' + suffix]} matched of "
                  f"{result['landmark_faces_labelled' + suffix]} with visible pseudo-labels (IoU >= 0.5)")
            if detector.gives_landmarks and result["nme" + suffix] is not None:
                print(f"  NME (inter-ocular)     {result['nme' + suffix]:.4f} mean, "
                      f"{result['nme_median' + suffix]:.4f} median, "
                      f"{result['nme_under_0_1' + suffix]:.3f} of faces under 0.1")
            if result["nme_box_prior" + suffix] is not None:
                print(f"  NME of the box prior   {result['nme_box_prior' + suffix]:.4f} mean, "
                      f"{result['nme_box_prior_under_0_1' + suffix]:.3f} of faces under 0.1")
    print(json.dumps(result))
    return 0
