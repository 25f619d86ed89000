"""Keras -> ONNX through tf2onnx, shared by the embedder and landmark exports: conversion with a
dynamic batch axis, and a check that onnxruntime reproduces Keras before the file is written."""
from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import numpy as np

OPSET = 17
INPUT_NAME = "image"


class ExportError(ValueError):
    """The converted model does not reproduce the Keras model."""


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


def convert(model, input_size: int, output_name: str):
    """ONNX ModelProto of `model` with a dynamic batch axis."""
    import tensorflow as tf
    import tf2onnx

    spec = [tf.TensorSpec((None, input_size, input_size, 3), tf.float32, name=INPUT_NAME)]
    with _conversion_patches():
        function = tf.function(lambda x: {output_name: model(x, training=False)})
        proto, _ = tf2onnx.convert.from_function(function, input_signature=spec, opset=OPSET)
    return proto


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

def save_verified(proto, out: Path, model, input_batches: list[np.ndarray], max_abs_diff: float) -> float:
    """Write `proto` to `out` only if onnxruntime reproduces `model` on every batch; the largest
    difference seen. A refused export leaves `out` as it was."""
    import onnx

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        candidate = Path(tmp) / out.name
        onnx.save(proto, candidate)
        diff = max(verify(candidate, model, batch, max_abs_diff) for batch in input_batches)
        candidate.replace(out)
    return diff
