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
import contextlib
import json
import logging
import tempfile
from pathlib import Path

import numpy as np

from stages.face_crop import DEFAULT_CROP_SCALE

log = logging.getLogger("facewatch.export_embedder")

OPSET = 17
MAX_ABS_DIFF = 1e-4
INPUT_NAME = "image"


class ExportError(ValueError):
    """The converted model does not reproduce the Keras model."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="embedder .keras checkpoint")
    parser.add_argument("--out", type=Path, default=Path("models/face_embedder.onnx"))
    parser.add_argument("--summary", type=Path, default=None,
                        help="training summary.json (default: beside --model, if present)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="override the suggested cosine-similarity threshold")
    parser.add_argument("--max-abs-diff", type=float, default=MAX_ABS_DIFF,
                        help="refuse the export when ONNX and Keras differ by more than this")


def run(args: argparse.Namespace) -> int:
    summary_path = args.summary or args.model.parent / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    if args.summary and not summary:
        raise FileNotFoundError(f"summary file not found: {args.summary}")
    try:
        report = export_embedder(args.model, args.out, summary, args.threshold, args.max_abs_diff)
    except ExportError as exc:
        log.error("%s", exc)
        return 1
    print(json.dumps(report))
    return 0


def load_keras_embedder(path: Path):
    import keras

    import training.embedder_model  # noqa: F401  registers the custom layers

    if not Path(path).is_file():
        raise FileNotFoundError(f"embedder checkpoint not found: {path}")
    model = keras.models.load_model(path, compile=False)
    if len(model.inputs) != 1 or len(model.outputs) != 1 or len(model.output.shape) != 2:
        raise ValueError(f"{path} is not an embedding network (one image input, one (N, D) output)")
    return model


@contextlib.contextmanager
def _conversion_patches():
    """STACK.md: make keras.applications ConvNeXt convertible; no effect on our small model."""
    import tensorflow as tf
    from keras.src.backend.tensorflow import nn as keras_tf_nn
    from tf2onnx import utils as tf2onnx_utils
    from tf2onnx.handler import tf_op

    original_conv = keras_tf_nn.conv

    def plain_conv(inputs, kernel, strides=1, padding="valid", data_format=None, dilation_rate=1):
        # Keras runs grouped convolutions inside a jit-compiled function tf2onnx cannot inline.
        data_format = "NHWC" if (data_format or "channels_last") == "channels_last" else "NCHW"
        return tf.nn.convolution(inputs, kernel, strides=strides, padding=padding.upper(),
                                 data_format=data_format, dilations=dilation_rate)

    if "Erfc" not in _registered_ops():
        @tf_op("Erfc")
        class Erfc:  # noqa: F841  registered by the decorator
            @classmethod
            def version_9(cls, ctx, node, **kwargs):
                source, output = node.input[0], node.output[0]
                shape, dtype = ctx.get_shape(output), ctx.get_dtype(output)
                one = ctx.make_const(tf2onnx_utils.make_name("one"), np.array(1.0, np.float32))
                erf = ctx.make_node("Erf", [source], shapes=[shape], dtypes=[dtype])
                ctx.remove_node(node.name)
                ctx.make_node("Sub", [one.output[0], erf.output[0]], outputs=[output],
                              name=node.name, shapes=[shape], dtypes=[dtype])

    keras_tf_nn.conv = plain_conv
    try:
        yield
    finally:
        keras_tf_nn.conv = original_conv


def _registered_ops() -> set[str]:
    from tf2onnx.handler import tf_op

    return {name for opset in tf_op._OPSETS.values() for version in opset for name in version}


def convert(model, input_size: int):
    """ONNX ModelProto of `model` with a dynamic batch axis."""
    import tensorflow as tf
    import tf2onnx

    spec = [tf.TensorSpec((None, input_size, input_size, 3), tf.float32, name=INPUT_NAME)]
    with _conversion_patches():
        function = tf.function(lambda x: {"embedding": model(x, training=False)})
        proto, _ = tf2onnx.convert.from_function(function, input_signature=spec, opset=OPSET)
    return proto


def sample_inputs(input_size: int, count: int = 4) -> np.ndarray:
    """Face-like test inputs: real LFW crops when the data is here, else smooth random images."""
    from training.lfw import default_images_dir

    images = default_images_dir()
    if images.is_dir():
        from stages.face_crop import crop_face
        from training.embedder_data import centre_box, read_image

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


def verify(onnx_path: Path, model, inputs: np.ndarray, max_abs_diff: float) -> float:
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises several unrelated types for a bad graph
        raise ExportError(f"export refused: onnxruntime cannot load the converted model: "
                          f"{str(exc).splitlines()[0][:400]}") from exc
    got = session.run(None, {session.get_inputs()[0].name: inputs})[0]
    want = np.asarray(model.predict(inputs, verbose=0))
    if got.shape != want.shape:
        raise ExportError(f"{onnx_path}: ONNX output shape {got.shape} != Keras {want.shape}")
    diff = float(np.max(np.abs(got - want)))
    if not diff <= max_abs_diff:
        raise ExportError(f"export refused: ONNX and Keras outputs differ by {diff:.3g} "
                          f"(> {max_abs_diff:g}); the converted graph is wrong")
    return diff


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
                                                   "threshold_at_far_1e-3", "pairs") if k in val}),
    }
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}


def export_embedder(model_path: Path, out: Path, summary: dict | None = None,
                    threshold: float | None = None, max_abs_diff: float = MAX_ABS_DIFF) -> dict:
    import onnx

    model = load_keras_embedder(model_path)
    input_size = int(model.input_shape[1])
    proto = convert(model, input_size)
    for key, value in build_metadata(model, summary or {}, threshold).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "facewatch export-embedder"
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Verify a temporary file; only a verified model replaces --out.
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        candidate = Path(tmp) / out.name
        onnx.save(proto, candidate)
        diff = verify(candidate, model, sample_inputs(input_size), max_abs_diff)
        batch_diff = verify(candidate, model, sample_inputs(input_size, 1), max_abs_diff)
        candidate.replace(out)
    return {"onnx": str(out), "max_abs_diff": max(diff, batch_diff), "opset": OPSET,
            "bytes": out.stat().st_size}
