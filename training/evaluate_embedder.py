"""Verification metrics of an embedder on LFW-format pairs, with faces found as the daemon finds them.

    facewatch evaluate-embedder --model models/face_embedder.onnx \
        --pairs training/splits/lfw_val_pairs.txt --images ../shared/data/lfw/lfw-deepfunneled \
        [--detector models/face_detector.onnx] [--roc-png roc.png] [--write-metadata]

Accepts the exported ONNX file (run through the daemon's FaceEmbedder) or a Keras `.keras`
checkpoint. Prints 10-fold accuracy, ROC AUC, TAR at FAR 1e-3 and the best threshold; the last
line on stdout is one JSON object with those numbers.

It also measures the impostor similarity distribution the daemon's open-set operating point is
derived from (stages.open_set): every cross-identity pair of the pairs' images, as a table of
pair FAR -> threshold. `--write-metadata` writes that table into the ONNX file's metadata
(`impostor_far_table`), which `match.target_far` needs.
"""
from __future__ import annotations

import os

# TensorFlow's C++ info lines (oneDNN, CPU features) would bury the training log.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

from facewatch.stages.face_crop import DEFAULT_CROP_SCALE, CropSpec
from facewatch.training.embedder_data import DEFAULT_DETECTOR, DETECTOR_IMGSZ, FaceBoxer, crop_images
from facewatch.training.lfw import Pair, image_path, read_pairs
from facewatch.training.verification_metrics import save_roc_png, verification_report

log = logging.getLogger("facewatch.evaluate_embedder")


class KerasEmbedder:
    """A `.keras` embedding network behind FaceEmbedder's interface (BGR crops in, unit vectors out)."""

    def __init__(self, model, crop_spec: CropSpec | None = None, flip_average: bool = True,
                 batch_size: int = 128):
        if isinstance(model, (str, Path)):
            import keras

            import facewatch.training.embedder_model  # noqa: F401  registers the custom layers

            path = Path(model)
            if not path.is_file():
                raise FileNotFoundError(f"embedder checkpoint not found: {path}")
            model = keras.models.load_model(path, compile=False)
        self.model = model
        self.input_size = int(model.input_shape[1])
        self.crop_spec = crop_spec or CropSpec(self.input_size)
        self.flip_average = flip_average
        self.batch_size = batch_size

    def embed(self, crops: np.ndarray) -> np.ndarray:
        if crops.ndim != 4 or crops.shape[1:] != (self.input_size, self.input_size, 3):
            raise ValueError(f"crops must be (N, {self.input_size}, {self.input_size}, 3), "
                             f"got {crops.shape}")
        batch = np.ascontiguousarray(crops[..., ::-1], dtype=np.float32)  # BGR -> RGB
        emb = self.model.predict(batch, batch_size=self.batch_size, verbose=0)
        if self.flip_average:
            emb = emb + self.model.predict(np.ascontiguousarray(batch[:, :, ::-1]),
                                           batch_size=self.batch_size, verbose=0)
        norm = np.linalg.norm(emb, axis=1, keepdims=True)
        return (emb / np.maximum(norm, 1e-12)).astype(np.float32)


def pair_scores(pairs: list[Pair], embeddings: dict[tuple[str, int], np.ndarray]) -> np.ndarray:
    """Cosine similarity per pair (embeddings are unit vectors)."""
    return np.array([float(np.dot(embeddings[(p.name1, p.index1)], embeddings[(p.name2, p.index2)]))
                     for p in pairs], np.float64)


def embed_images(embedder, keys: list[tuple[str, int]], crops: np.ndarray,
                 chunk: int = 256) -> dict[tuple[str, int], np.ndarray]:
    out: dict[tuple[str, int], np.ndarray] = {}
    for start in range(0, len(keys), chunk):
        emb = embedder.embed(crops[start:start + chunk])
        out.update(zip(keys[start:start + chunk], emb))
    return out


def impostor_table(keys: list[tuple[str, int]], embeddings: dict, source: str):
    """stages.open_set.FarTable of every cross-identity pair of these images."""
    from facewatch.stages.open_set import FarTable

    names = np.array([k[0] for k in keys])
    emb = np.stack([embeddings[k] for k in keys]).astype(np.float32)
    upper = np.triu_indices(len(keys), 1)
    sims = (emb @ emb.T)[upper]
    return FarTable.from_scores(sims[names[upper[0]] != names[upper[1]]], len(keys), source)


def one_shot_identification(keys: list[tuple[str, int]], embeddings: dict) -> dict | None:
    """training.open_set_identification on these images, or None when too few people (a
    --max-pairs subset) leave no strangers beside a full gallery."""
    from facewatch.training.open_set_identification import (GALLERY_SIZE, eligible_people,
                                                            open_set_identification)

    names = [k[0] for k in keys]
    if len(eligible_people(names)) <= GALLERY_SIZE:
        return None
    return open_set_identification(names, np.stack([embeddings[k] for k in keys]))


def tar_at_table_far(genuine: np.ndarray, table, far: float) -> float | None:
    """Share of same-person pairs at or above the table's threshold for `far`. The pairs' own
    TAR at FAR 1e-3 rests on the third-highest of their 3,000 impostor scores and moves by
    +-0.02 between neighbouring checkpoints; the table's threshold rests on every cross-identity
    pair of the images (~400,000 on LFW's validation pairs, ~400 above it)."""
    if far not in table.far:
        return None
    threshold = table.threshold[table.far.index(far)]
    return float(np.mean(genuine >= threshold)) if len(genuine) else None


def evaluate_pairs(embedder, pairs: list[Pair], folds: list[int], images_dir: Path,
                   boxer: FaceBoxer, roc_png: Path | None = None, source: str = "pairs",
                   face_px: float | None = None) -> dict:
    keys = sorted({(p.name1, p.index1) for p in pairs} | {(p.name2, p.index2) for p in pairs})
    missing = [image_path(images_dir, n, i) for n, i in keys if not image_path(images_dir, n, i).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} pair images are missing, e.g. {missing[0]}")
    start = time.monotonic()
    crops, aligned = crop_images([image_path(images_dir, n, i) for n, i in keys], boxer,
                                 embedder.crop_spec, face_px=face_px)
    embeddings = embed_images(embedder, keys, crops)
    scores = pair_scores(pairs, embeddings)
    labels = np.array([p.same for p in pairs])
    report = verification_report(scores, labels, folds)
    report.update(images=len(keys), centre_box_fallbacks=boxer.fallbacks, boxes_from=boxer.description,
                  crop_alignment=embedder.crop_spec.alignment, aligned_on_landmarks=aligned,
                  seconds=round(time.monotonic() - start, 1), face_px=face_px,
                  crop_sharpness=sharpness_summary(crops))
    table = report["impostor_far_table"] = impostor_table(
        keys, embeddings, f"{source}: every cross-identity pair of its {len(keys)} images, "
                          f"{embedder.crop_spec.alignment} crops, boxes from {boxer.description}")
    report["tar_at_far_1e-3_all_impostors"] = tar_at_table_far(scores[labels], table, 1e-3)
    report["open_set"] = one_shot_identification(keys, embeddings)
    if roc_png is not None:
        save_roc_png(scores, labels, roc_png, title=f"ROC ({len(pairs)} pairs)")
    return report


def sharpness_summary(crops: np.ndarray) -> dict:
    """What the daemon's quality gate (detect.min_blur) would measure on these crops."""
    from facewatch.daemon.config import DetectConfig
    from facewatch.stages.quality import sharpness

    values = sharpness(crops)
    min_blur = DetectConfig.model_fields["min_blur"].default
    return {"p10": round(float(np.percentile(values, 10)), 1),
            "p50": round(float(np.median(values)), 1),
            "p90": round(float(np.percentile(values, 90)), 1),
            "min_blur": min_blur, "under_min_blur": round(float((values < min_blur).mean()), 4)}


def is_teacher(model) -> bool:
    """`--model sface` / `sface:SIZE` names the SFace teacher, not a file."""
    return str(model).split(":")[0] == "sface"


def load_embedder(path: Path, flip_average: bool | None = None):
    """FaceEmbedder for .onnx (exactly the daemon's runtime), KerasEmbedder for .keras; `sface`
    or `sface:SIZE`: the SFace teacher on the same crops (the ceiling a student could reach)."""
    if is_teacher(path):
        from facewatch.training.sface_teacher import SFACE_SIZE, SFaceEmbedder

        size = str(path).partition(":")[2]
        if size and not (size.isdigit() and int(size) >= 32):
            raise ValueError(f"--model sface:SIZE takes a crop size of at least 32 pixels, got {path}")
        return SFaceEmbedder(int(size) if size else SFACE_SIZE)
    path = Path(path)
    if path.suffix == ".keras":
        summary = path.parent / "summary.json"
        state = path.parent / "state.json"   # a run still training has no summary yet
        info = json.loads(summary.read_text()) if summary.is_file() else {}
        if not info and state.is_file():
            run_args = json.loads(state.read_text())["args"]
            info = {"crop_alignment": run_args.get("alignment", "box"),
                    "crop_scale": run_args.get("crop_scale", DEFAULT_CROP_SCALE)}
        embedder = KerasEmbedder(path, flip_average=True if flip_average is None else flip_average)
        embedder.crop_spec = CropSpec(embedder.input_size, info.get("crop_alignment", "box"),
                                      float(info.get("crop_scale", DEFAULT_CROP_SCALE)))
        return embedder
    from facewatch.stages.face_embedder import FaceEmbedder

    return FaceEmbedder(path, providers=("CPUExecutionProvider",), flip_average=flip_average)


def _positive_px(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value >= 4:
        raise argparse.ArgumentTypeError(f"--face-px must be a face height of at least 4 pixels, "
                                         f"got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from facewatch.training.lfw import VAL_PAIRS_FILE, default_images_dir

    parser.add_argument("--model", type=Path, required=True,
                        help=".onnx export or .keras checkpoint; `sface` (or `sface:96`: crops at 96 "
                             "px scaled up): the SFace teacher on the same crops, the ceiling")
    parser.add_argument("--pairs", type=Path, default=VAL_PAIRS_FILE,
                        help="LFW-format pairs file (default: the fixed validation pairs)")
    parser.add_argument("--images", type=Path, default=None,
                        help=f"folder-per-identity images (default {default_images_dir()})")
    parser.add_argument("--detector", type=Path, default=DEFAULT_DETECTOR,
                        help="face detector ONNX; without it, faces are cropped with the centre box")
    parser.add_argument("--landmarks", default=str(DEFAULT_DETECTOR.parent / "face_landmarks.onnx"),
                        help="landmark model for an embedder that aligns on five points, as the "
                             "daemon runs it; 'none': the detector's own keypoints or the box fallback")
    parser.add_argument("--detector-imgsz", type=int, default=DETECTOR_IMGSZ,
                        help="detector input size (same default as the training crop cache)")
    parser.add_argument("--face-px", type=_positive_px, default=None,
                        help="crop every face as if it were this many pixels tall in the frame "
                             "(downscaled and scaled back; boxes and landmarks from the full "
                             "image): how accuracy and crop sharpness fall with face size")
    parser.add_argument("--roc-png", type=Path, default=None, help="write the ROC curve here")
    parser.add_argument("--max-pairs", type=int, default=None,
                        help="evaluate an evenly spread subset of this many pairs")
    parser.add_argument("--no-flip-average", action="store_true",
                        help="embed each face once, without its mirror image")
    parser.add_argument("--write-metadata", action="store_true",
                        help="write the measured impostor FAR table into the ONNX model's "
                             "metadata (the daemon's match.target_far needs it)")


METADATA_KEY_TEXT = "impostor_far_table"


def write_far_table(model: Path, table) -> None:
    """Into the ONNX embedder's metadata (export.onnx_metadata), where the daemon reads it."""
    from facewatch.export.onnx_metadata import set_metadata
    from facewatch.stages.open_set import METADATA_KEY

    if Path(model).suffix != ".onnx":
        raise ValueError(f"--write-metadata needs the exported .onnx model, got {model}")
    set_metadata(Path(model), {METADATA_KEY: table.to_json()})


def subset_pairs(pairs: list[Pair], folds: list[int], count: int) -> tuple[list[Pair], list[int]]:
    """Every k-th pair: keeps the match/mismatch balance and every fold."""
    step = max(1, len(pairs) // count)
    idx = list(range(0, len(pairs), step))[:count]
    return [pairs[i] for i in idx], [folds[i] for i in idx]


def run(args: argparse.Namespace) -> int:
    from facewatch.training.lfw import default_images_dir

    images = Path(args.images or default_images_dir())
    if not images.is_dir():
        raise FileNotFoundError(f"images folder not found: {images}")
    if args.face_px is not None and args.write_metadata:
        raise SystemExit("--write-metadata with --face-px would store the impostor table of "
                         "degraded faces as the model's open-set calibration; run them apart")
    if args.write_metadata and is_teacher(args.model):
        raise SystemExit("--write-metadata needs an ONNX file: --model sface is the teacher")
    pairs, folds = read_pairs(args.pairs)
    if args.max_pairs:
        pairs, folds = subset_pairs(pairs, folds, args.max_pairs)
    embedder = load_embedder(args.model, False if args.no_flip_average else None)
    detector = args.detector if args.detector and Path(args.detector).is_file() else None
    if args.detector and detector is None:
        log.warning("detector %s not found: cropping with the fixed centre box", args.detector)
    from facewatch.stages.face_landmarks import landmarks_to_run

    landmarks = None if str(args.landmarks).lower() == "none" else Path(args.landmarks)
    boxer = FaceBoxer(detector, args.detector_imgsz,
                      landmarks=landmarks_to_run(embedder.crop_spec.alignment, landmarks))
    report = evaluate_pairs(embedder, pairs, folds, images, boxer, args.roc_png,
                            source=Path(args.pairs).name, face_px=args.face_px)
    table = report["impostor_far_table"]
    print(f"pairs: {report['pairs']} ({len(set(folds))} folds), images: {report['images']}, "
          f"boxes: {report['boxes_from']}, centre-box fallbacks: {report['centre_box_fallbacks']}, "
          f"{report['crop_alignment']} crops, {report['aligned_on_landmarks']} aligned on landmarks")
    sharp = report["crop_sharpness"]
    print(f"faces {'as ' + format(args.face_px, 'g') + ' px tall' if args.face_px else 'as in the images'}: "
          f"crop sharpness p10/p50/p90 {sharp['p10']}/{sharp['p50']}/{sharp['p90']}, "
          f"{sharp['under_min_blur']:.1%} under detect.min_blur {sharp['min_blur']:g}")
    print(f"10-fold accuracy: {report['accuracy']:.4f} +- {report['accuracy_std']:.4f}")
    print(f"ROC AUC: {report['auc']:.4f}   TAR@FAR=1e-3: {report['tar_at_far_1e-3']:.4f}")
    if report["tar_at_far_1e-3_all_impostors"] is not None:
        print(f"TAR at the FAR 1e-3 threshold of all {table.pairs} cross-identity pairs: "
              f"{report['tar_at_far_1e-3_all_impostors']:.4f}")
    open_set = report["open_set"]
    if open_set is not None:
        print(f"one-shot identification ({open_set['gallery_size']} people enrolled from one photo, "
              f"the other {open_set['people'] - open_set['gallery_size']} strangers, "
              f"{open_set['trials']} random galleries): rank-1 {open_set['rank1']:.4f}, "
              + ", ".join(f"TPIR {t:.4f} at FPIR {f}" for f, t in open_set["tpir_at_fpir"].items()))
    print(f"best threshold (cosine similarity, all pairs): {report['threshold']:.4f} "
          f"(accuracy {report['accuracy_at_threshold']:.4f})")
    if args.roc_png:
        print(f"ROC curve: {args.roc_png}")
    print(f"impostors: {table.pairs} cross-identity pairs of {table.images} images; thresholds "
          + ", ".join(f"{t:.3f} at FAR {f:g}" for f, t in zip(table.far, table.threshold)))
    if args.write_metadata:
        write_far_table(args.model, table)
        print(f"wrote {METADATA_KEY_TEXT} into {args.model}")
    print(json.dumps({k: report[k] for k in ("accuracy", "auc", "tar_at_far_1e-3",
                                             "tar_at_far_1e-3_all_impostors", "threshold",
                                             "threshold_at_far_1e-3", "crop_alignment",
                                             "aligned_on_landmarks")}
                     | {"pairs": report["pairs"], "model": str(args.model), "open_set": open_set,
                        "face_px": args.face_px, "crop_sharpness": report["crop_sharpness"],
                        "impostor_far_table": json.loads(table.to_json())}))
    return 0
