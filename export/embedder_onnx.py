"""Export an embedder checkpoint (`.keras`) to the ONNX file the daemon runs, with its metadata.

    facewatch export-embedder --model runs/embedder/<run>/best.keras --out models/face_embedder.onnx \
        [--summary runs/embedder/<run>/summary.json]

tf2onnx, opset 17, dynamic batch. The file is then loaded in onnxruntime and compared with
Keras on real-looking inputs; an export that differs by more than 1e-4 is refused (exit 1) and
not left at --out. keras.applications ConvNeXt needs two conversion-time patches (STACK.md):
its grouped convolution is routed through plain `tf.nn.convolution`, and `Erfc(x)` is written
as `1 - Erf(x)`. Our small ConvNeXt converts without them.
"""
from __future__ import annotations

import os

# TensorFlow's C++ info lines (oneDNN, CPU features) would bury the training log.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from facewatch.export.keras_onnx import OPSET, ExportError, convert, save_verified
from facewatch.stages.face_crop import DEFAULT_CROP_SCALE

log = logging.getLogger("facewatch.export_embedder")

MAX_ABS_DIFF = 1e-4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="embedder .keras checkpoint")
    parser.add_argument("--out", type=Path, default=Path("models/face_embedder.onnx"),
                        help="ONNX file to write (default: models/face_embedder.onnx)")
    parser.add_argument("--summary", type=Path, default=None,
                        help="training summary.json (default: beside --model, if present)")
    parser.add_argument("--val-of", choices=["best", "last"], default="best",
                        help="whose validation figures go into the metadata: the run's best "
                             "epoch (best.keras, the default) or its last one (embedder.keras)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="the metadata's cosine-similarity threshold (default: the FAR 1e-3 "
                             "point of the impostor table the export measures; with "
                             "--no-open-set, the training validation's)")
    parser.add_argument("--max-abs-diff", type=float, default=MAX_ABS_DIFF,
                        help="refuse the export when ONNX and Keras differ by more than this")
    parser.add_argument("--no-open-set", action="store_true",
                        help="skip measuring the impostor FAR table on the validation pairs "
                             "(the daemon's match.target_far then falls back to the metadata "
                             "threshold)")
    parser.add_argument("--landmarks", type=Path, default=None,
                        help="landmark model for measuring the FAR table of an embedder that "
                             "aligns on five points (default: models/face_landmarks.onnx); "
                             "name the one that ships with it when its layout is new")


def run(args: argparse.Namespace) -> int:
    summary_path = args.summary or args.model.parent / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    if args.summary and not summary:
        raise FileNotFoundError(f"summary file not found: {args.summary}")
    if args.val_of == "last" and not summary:
        raise FileNotFoundError(f"--val-of last needs the run's summary.json: none at {summary_path}")
    if summary:
        try:
            summary = {**summary, "val": validation_of(summary, args.val_of)}
        except (KeyError, ValueError) as exc:   # before --out is touched
            raise ValueError(f"{summary_path}: no usable validation figures for --val-of "
                             f"{args.val_of} ({exc})") from None
    if not args.no_open_set and summary.get("crop_alignment"):
        # The FAR-table step aligns with a landmark model: refuse a missing one or one of the
        # other layout now, before --out (often the shipped file) is replaced.
        from facewatch.stages.errors import ModelError
        from facewatch.stages.face_landmarks import landmarks_to_run
        try:
            landmarks_to_run(summary["crop_alignment"], landmark_file(args.landmarks))
        except ModelError as exc:
            log.error("%s; name the landmark model that goes with this embedder with --landmarks "
                      "(or skip the table with --no-open-set)", exc)
            return 1
    try:
        report = export_embedder(args.model, args.out, summary, args.threshold, args.max_abs_diff)
    except ExportError as exc:
        log.error("%s", exc)
        return 1
    if not args.no_open_set:
        table = measure_open_set(args.out, args.landmarks)
        if table is not None:
            report["impostor_far_table"] = json.loads(table.to_json())
            if args.threshold is None:
                report["threshold"] = adopt_table_threshold(args.out, table)
    print(json.dumps(report))
    return 0


def adopt_table_threshold(model: Path, table) -> float:
    """Make the table's FAR 1e-3 point the file's metadata threshold (what the daemon uses when
    `match.target_far` is off): the pairs' own FAR 1e-3 point rests on the third-highest of
    their 3,000 impostor scores, the table's on all cross-identity pairs of the same images."""
    from facewatch.export.onnx_metadata import set_metadata

    threshold = float(table.threshold_at(1e-3)[0])
    set_metadata(Path(model), {
        "threshold": json.dumps(threshold),
        "threshold_kind": "cosine similarity; same person when >= threshold; FAR 1e-3 over every "
                          "cross-identity pair of the validation images, through the runtime path"})
    return threshold


def validation_of(summary: dict, which: str) -> dict:
    """The validation figures of the run's best or last epoch. Summaries that lack them whole
    (written before `last_val` existed, or by a resumed run that had lost its best's figures)
    give them from their history, without the FAR 1e-3 threshold, which then comes from
    --threshold or the measured FAR table."""
    from facewatch.training.verification_metrics import from_history

    whole = summary.get("val" if which == "best" else "last_val")
    if whole:
        return whole
    validated = [r for r in summary.get("history", []) if "val_accuracy" in r
                 and (which == "last" or r["epoch"] == summary.get("best_epoch"))]
    if not validated:
        raise ValueError(f"the summary has no validation figures for its {which} epoch")
    return from_history(validated[-1], summary.get("data", {}).get("val_pairs"))


def landmark_file(landmarks: Path | None) -> Path:
    """The landmark model the FAR table is measured with: the given one, else the shipped one."""
    from facewatch.training.embedder_data import DEFAULT_DETECTOR

    return landmarks or Path(DEFAULT_DETECTOR).parent / "face_landmarks.onnx"


def measure_open_set(model: Path, landmarks: Path | None = None):
    """The impostor FAR table of the exported file, measured through the runtime path on the
    validation pairs (as `facewatch evaluate-embedder --write-metadata`) and written into its
    metadata; None, with a warning, when the pairs' images or the detector are not here.
    `landmarks`: the landmark model to align with (default: the shipped one)."""
    from facewatch.training.embedder_data import DEFAULT_DETECTOR, DETECTOR_IMGSZ, FaceBoxer
    from facewatch.training.evaluate_embedder import evaluate_pairs, load_embedder, write_far_table
    from facewatch.training.lfw import VAL_PAIRS_FILE, default_images_dir, read_pairs
    from facewatch.stages.face_landmarks import landmarks_to_run

    images = default_images_dir()
    if not images.is_dir() or not Path(DEFAULT_DETECTOR).is_file():
        log.warning("no LFW images at %s or no detector at %s: impostor_far_table not written; "
                    "run `facewatch evaluate-embedder --write-metadata` where they are",
                    images, DEFAULT_DETECTOR)
        return None
    embedder = load_embedder(Path(model))
    pairs, folds = read_pairs(VAL_PAIRS_FILE)
    boxer = FaceBoxer(Path(DEFAULT_DETECTOR), DETECTOR_IMGSZ,
                      landmarks=landmarks_to_run(embedder.crop_spec.alignment,
                                                 landmark_file(landmarks)))
    report = evaluate_pairs(embedder, pairs, folds, images, boxer, source=VAL_PAIRS_FILE.name)
    write_far_table(Path(model), report["impostor_far_table"])
    return report["impostor_far_table"]


def load_keras_embedder(path: Path):
    import keras

    import facewatch.training.embedder_model  # noqa: F401  registers the custom layers

    if not Path(path).is_file():
        raise FileNotFoundError(f"embedder checkpoint not found: {path}")
    model = keras.models.load_model(path, compile=False)
    if len(model.inputs) != 1 or len(model.outputs) != 1 or len(model.output.shape) != 2:
        raise ValueError(f"{path} is not an embedding network (one image input, one (N, D) output)")
    return model


def sample_inputs(input_size: int, count: int = 4) -> np.ndarray:
    """Face-like test inputs: real LFW crops when the data is here, else smooth random images."""
    from facewatch.training.lfw import default_images_dir

    images = default_images_dir()
    if images.is_dir():
        from facewatch.stages.face_crop import crop_face
        from facewatch.training.embedder_data import centre_box, read_image

        paths = sorted(images.glob("*/*_0001.jpg"))[:: 500][:count]
        if paths:
            crops = []
            for p in paths:
                frame = read_image(p)
                crops.append(crop_face(frame, centre_box(frame.shape), input_size)[..., ::-1])
            return np.stack(crops).astype(np.float32)
    rng = np.random.default_rng(0)
    import cv2

    small = rng.uniform(0, 255, (count, 8, 8, 3)).astype(np.float32)
    return np.stack([cv2.resize(s, (input_size, input_size)) for s in small])


def build_metadata(model, summary: dict, threshold: float | None) -> dict[str, str]:
    val = summary.get("val") or {}
    # The daemon compares each face with every gallery entry, so an unknown person is falsely
    # named about N times as often as one verification pair is falsely accepted: its default is
    # the validated threshold at FAR 1e-3, not the pair-accuracy optimum (which sits near FAR
    # 5-10%, and named 28 of 29 strangers against a 60-person gallery in evaluate-oneshot).
    if threshold is None:
        threshold = val.get("threshold_at_far_1e-3", summary.get("threshold"))
    if threshold is None:
        log.warning("no validated threshold (no summary.json): writing 0.5; pass --threshold")
        threshold = 0.5
    meta = {
        "facewatch_embedder": "1",
        "input_size": int(model.input_shape[1]),
        "embedding_size": int(model.output.shape[-1]),
        "normalisation": "input float32 NHWC RGB 0..255; scaling inside the graph; output L2-normalised",
        "channel_order": "RGB",
        "crop_scale": float(summary.get("crop_scale", DEFAULT_CROP_SCALE)),
        "crop_alignment": str(summary.get("crop_alignment", "box")),
        "flip_average": bool(summary.get("flip_average", True)),
        "threshold": float(threshold),
        "threshold_kind": "cosine similarity; same person when >= threshold; chosen at FAR 1e-3 "
                          "on the validation pairs",
        "pair_accuracy_threshold": float(val.get("threshold", threshold)),
        "backbone": summary.get("backbone", model.name),
        "loss": summary.get("loss", "unknown"),
        "training_data": json.dumps(summary.get("data", {})),
        "metrics": json.dumps({k: val[k] for k in ("accuracy", "auc", "tar_at_far_1e-3", "threshold",
                                                   "threshold_at_far_1e-3", "pairs", "epoch") if k in val}),
    }
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}


def export_embedder(model_path: Path, out: Path, summary: dict | None = None,
                    threshold: float | None = None, max_abs_diff: float = MAX_ABS_DIFF) -> dict:
    model = load_keras_embedder(model_path)
    input_size = int(model.input_shape[1])
    proto = convert(model, input_size, "embedding")
    for key, value in build_metadata(model, summary or {}, threshold).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "facewatch export-embedder"
    diff = save_verified(proto, Path(out), model, [sample_inputs(input_size), sample_inputs(input_size, 1)],
                         max_abs_diff)
    return {"onnx": str(out), "max_abs_diff": diff, "opset": OPSET, "bytes": Path(out).stat().st_size}
