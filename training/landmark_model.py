"""The landmark regressor: a small plain CNN from a box crop to five (x, y) points.

Plain 3x3 convolutions, batch norm and ReLU (cheap on every execution provider and trivial for
tf2onnx), four stride-2 stages down to 4x4, then a dense head. Points are fractions of the crop
side. About 0.45 M parameters; well under a millisecond a face on one CPU core.
"""
from __future__ import annotations

import keras
from keras import layers

NUM_OUTPUTS = 10  # x, y of five points


def build_landmark_model(input_size: int = 64, widths=(32, 48, 64, 96)) -> keras.Model:
    inputs = keras.Input((input_size, input_size, 3), name="image")  # RGB 0..255
    x = layers.Rescaling(1 / 127.5, offset=-1.0)(inputs)
    x = _conv(x, 24, 1)
    for width in widths:
        x = _conv(x, width, 2)
        x = _conv(x, width, 1)
    x = layers.Flatten()(x)
    x = layers.Dense(128, activation="relu")(x)
    outputs = layers.Dense(NUM_OUTPUTS, name="points")(x)
    return keras.Model(inputs, outputs, name="landmarks")


def _conv(x, filters: int, stride: int):
    x = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False)(x)
    x = layers.BatchNormalization()(x)
    return layers.ReLU()(x)
