"""`facewatch quantize-model`: an int8 copy of a shipped model for CPU inference (issue 14).

    facewatch quantize-model --kind detector   --model models/face_detector.onnx
    facewatch quantize-model --kind landmarks  --model models/face_landmarks.onnx
    facewatch quantize-model --kind embedder   --model models/face_embedder.onnx

Two onnxruntime modes, chosen per model by measurement (model card, "int8 on the CPU"):
- `static` (the detector and landmark CNNs): QDQ format, per-channel int8 weights, uint8
  activations (x86's fast u8s8 kernels) with ranges calibrated on real inputs made exactly as
  the daemon makes them (the detector's letterbox, the landmark model's box crops) from
  training-side images (WIDER training events, LFW training people), never validation images.
  Only convolutions and matrix products are quantised; box decoding and outputs stay float.
- `dynamic` (the embedder): int8 weights of the matrix products, activations quantised per
  batch at run time. The ConvNeXt spends its time in the MLP MatMuls; static QDQ around its
  LayerNorms and depthwise convs was slower than float here (measured), dynamic 1.8x faster.

The int8 file is written beside the original as `<name>.int8.onnx` with the original's
metadata plus `quantization` (method, calibration images, parent file hash). An embedder copy
also records `embedding_space`: the parent's model id, so gallery rows enrolled with either file
stay comparable; that claim is only true if the copy's accuracy holds, which
`facewatch evaluate-embedder` checks and the model card reports.
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

import cv2
import numpy as np

from facewatch.training.paths import shared_data_dir

log = logging.getLogger("facewatch.quantize")
KINDS = ("detector", "landmarks", "embedder")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kind", choices=KINDS, required=True, help="which model the file is")
    parser.add_argument("--model", type=Path, required=True, help="the float ONNX file")
    parser.add_argument("--out", type=Path, default=None,
                        help="output file (default: <model>.int8.onnx beside it)")
    parser.add_argument("--images", type=int, default=200,
                        help="calibration images (training side only; default 200)")
    parser.add_argument("--detector", type=Path, default=Path("models/face_detector.onnx"),
                        help="with --kind landmarks/embedder: the detector that finds the faces")
    parser.add_argument("--landmarks", type=Path, default=Path("models/face_landmarks.onnx"),
                        help="with --kind embedder: the landmark model for aligned crops")
    parser.add_argument("--mode", choices=["static", "dynamic"], default=None,
                        help="static (calibrated activations) or dynamic (weights only, activations "
                             "per batch); default: dynamic for the embedder, static otherwise")
    parser.add_argument("--method", choices=["minmax", "percentile", "entropy"], default="minmax",
                        help="static mode: activation range calibration (default minmax)")


def int8_path(model: Path) -> Path:
    return model.with_name(f"{model.stem}.int8{model.suffix}")


def calibration_images(count: int) -> list[np.ndarray]:
    """Training-side images: half WIDER training events (crowds, small faces), half LFW training
    people (portraits), evenly spaced so every event and many people appear."""
    from facewatch.training.lfw import default_images_dir, image_path, list_people, load_split as lfw_split
    from facewatch.training.widerface import load_split

    root = shared_data_dir() / "widerface" / "images"
    wider = load_split()["train"]
    wider = [root / rel for rel in wider[:: max(1, len(wider) // (count - count // 2))]]
    people = list_people(default_images_dir())
    val = set(lfw_split(default_images_dir())["val_people"])
    lfw = [image_path(default_images_dir(), n, idx[0]) for n, idx in people.items() if n not in val]
    lfw = lfw[:: max(1, len(lfw) // (count // 2))]
    images = [cv2.imread(str(p)) for p in wider[: count - count // 2] + lfw[: count // 2]]
    return [i for i in images if i is not None]


def detector_inputs(model: Path, images: list[np.ndarray]) -> list[np.ndarray]:
    from facewatch.stages.face_detector import FaceDetector

    from facewatch.stages.face_detector import letterbox

    detector = FaceDetector(model, providers=["CPUExecutionProvider"])
    # square letterbox: the calibrator's histograms want one shape for every input
    return [cv2.dnn.blobFromImages([letterbox(image, detector.imgsz)[0]], 1 / 255.0, swapRB=True)
            for image in images]


def face_boxes(detector_path: Path, images: list[np.ndarray], landmarks: Path | None = None):
    from facewatch.stages.face_detector import FaceDetector

    detector = FaceDetector(detector_path, providers=["CPUExecutionProvider"], landmarks=landmarks)
    return [(image, det) for image in images for det in detector.detect([image]) if len(det)]


def landmark_inputs(model: Path, detector: Path, images: list[np.ndarray]) -> list[np.ndarray]:
    from facewatch.stages.face_landmarks import LandmarkModel

    landmarks = LandmarkModel(model, providers=["CPUExecutionProvider"])
    out = []
    for image, det in face_boxes(detector, images):
        crops, _ = landmarks.crops(image, det.boxes[:16])
        out.append(np.ascontiguousarray(crops[..., ::-1], np.float32))
    return out


def embedder_inputs(model: Path, detector: Path, landmarks: Path, images: list[np.ndarray]
                    ) -> list[np.ndarray]:
    from facewatch.stages.face_crop import crop_faces
    from facewatch.stages.face_embedder import FaceEmbedder

    embedder = FaceEmbedder(model, providers=["CPUExecutionProvider"])
    use_landmarks = landmarks if embedder.crop_spec.alignment != "box" else None
    out = []
    for image, det in face_boxes(detector, images, use_landmarks):
        crops = crop_faces(image, det.boxes[:16], embedder.crop_spec, det.landmarks)[0]
        batch = crops[..., ::-1] if embedder.channel_order == "RGB" else crops
        out.append(np.ascontiguousarray(batch, np.float32))
        out.append(np.ascontiguousarray(out[-1][:, :, ::-1]))  # mirrored: the flip average runs it too
    return out


class _Reader:
    """onnxruntime's CalibrationDataReader over a list of ready input batches."""

    def __init__(self, name: str, batches: list[np.ndarray]):
        # one sample at a time: the calibrator's histograms want one shape for every input
        self.name, self.batches = name, iter([b[i:i + 1] for b in batches for i in range(len(b))])

    def get_next(self):
        batch = next(self.batches, None)
        return None if batch is None else {self.name: batch}


def quantize(model: Path, out: Path, batches: list[np.ndarray] | None, method: str) -> None:
    """Static QDQ with `batches` as calibration inputs, or dynamic when `batches` is None."""
    import onnx
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(model), str(prepared), skip_symbolic_shape=True)
        if batches is None:
            quantize_dynamic(str(prepared), str(out), weight_type=QuantType.QInt8,
                             op_types_to_quantize=["MatMul", "Gemm"])
            return
        if not batches:
            raise ValueError(f"no calibration inputs could be made for {model} (no faces found?)")
        name = onnx.load(str(model), load_external_data=False).graph.input[0].name
        calibrate = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                     "entropy": CalibrationMethod.Entropy}[method]
        quantize_static(str(prepared), str(out), _Reader(name, batches), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=["Conv", "MatMul", "Gemm"], calibrate_method=calibrate,
                        extra_options={"CalibPercentile": 99.999})


def run(args: argparse.Namespace) -> int:
    from facewatch.export.onnx_metadata import set_metadata
    from facewatch.stages.gallery import file_model_id, file_sha256
    from facewatch.stages.onnx_session import load_session, metadata

    if not args.model.is_file():
        raise FileNotFoundError(f"model to quantise not found: {args.model}")
    # a file the runtime cannot load is refused here, naming it (ModelError), not deep inside
    # onnxruntime's quantiser
    load_session(args.model, ["CPUExecutionProvider"], what=f"{args.kind} model to quantise")
    out = args.out or int8_path(args.model)
    mode = args.mode or ("dynamic" if args.kind == "embedder" else "static")
    images, batches = [], None
    if mode == "static":
        images = calibration_images(args.images)
        if args.kind == "detector":
            batches = detector_inputs(args.model, images)
        elif args.kind == "landmarks":
            batches = landmark_inputs(args.model, args.detector, images)
        else:
            batches = embedder_inputs(args.model, args.detector, args.landmarks, images)
    quantize(args.model, out, batches, args.method)
    import onnx

    # the parent's metadata as written (raw strings: ultralytics' are Python literals, not JSON)
    meta: dict = {p.key: p.value for p in onnx.load(str(args.model), load_external_data=False).metadata_props}
    if mode == "static":
        meta["quantization"] = {
            "mode": "static QDQ", "weights": "int8 per channel", "activations": "uint8, calibrated",
            "calibration": f"{args.method}, {sum(len(b) for b in batches)} inputs from {len(images)} "
                           f"training-side images (WIDER train events, LFW training people)"}
    else:
        meta["quantization"] = {"mode": "dynamic", "weights": "int8 (MatMul, Gemm)",
                                "activations": "uint8, quantised per batch at run time"}
    meta["quantization"]["parent_sha256"] = file_sha256(args.model)[:16]
    if args.kind == "embedder":
        parent_space = metadata(load_session(args.model, ["CPUExecutionProvider"])).get("embedding_space")
        meta["embedding_space"] = parent_space or file_model_id(args.model)
    set_metadata(out, meta)
    print(json.dumps({"model": str(out), "kind": args.kind, "bytes": out.stat().st_size,
                      "parent_bytes": args.model.stat().st_size, **meta["quantization"]}))
    return 0
