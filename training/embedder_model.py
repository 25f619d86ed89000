"""The ConvNeXt-Siamese embedder: one shared ConvNeXt twin -> projection -> unit embedding.

Siamese here means every face goes through the same network and faces are compared by cosine
similarity of their embeddings; the training wrapper (`EmbedderTrainer`) adds the loss side
(ArcFace class weights, or pair/triplet losses on the batch). Only the embedding network is
saved as `embedder.keras` and exported to ONNX.

Everything is written with `keras.layers` / `keras.ops` only, so it runs on the TensorFlow and
the PyTorch backends. The input is float32 NHWC RGB 0..255; rescaling is inside the graph.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import keras
from keras import layers, ops

from facewatch.training.embedder_losses import (LOSSES, ArcMarginHead, arcface_loss, contrastive_loss,
                                      distillation_loss,
                                      triplet_loss)

INPUT_SIZE = 112

# keras.applications backbones (need the STACK.md conversion patch to export) and ours.
APPLICATIONS = {
    "convnext_tiny": "ConvNeXtTiny",
    "convnext_small": "ConvNeXtSmall",
    "convnext_base": "ConvNeXtBase",
    "convnext_large": "ConvNeXtLarge",
    "convnext_xlarge": "ConvNeXtXLarge",
}


@dataclass(frozen=True)
class SmallConvNeXtConfig:
    """Our CPU-sized ConvNeXt: ~2 M parameters, stride-4 stem, 4x4 final map at 112 px."""
    dims: tuple[int, ...] = (32, 64, 128, 256)
    depths: tuple[int, ...] = (2, 2, 4, 2)
    stem_stride: int = 4
    layer_scale_init: float = 1e-6
    drop_path: float = 0.0


SMALL_CONFIGS = {
    "small": SmallConvNeXtConfig(),
    # 3.7 M parameters at 96 px (4.0 M at 112), ~1.2-1.5x small's training time per epoch on
    # the CPU: the capacity step once teachers stop helping small.
    "wide": SmallConvNeXtConfig(dims=(40, 80, 160, 320), depths=(2, 2, 6, 2)),
    # small with four more blocks in stage 3 (2.75 M parameters against 2.20 M, ~1.4x small's
    # multiply-adds at 96 px by count): grown from a trained small (`--init-from`), whose function it keeps at the start
    # since a new block's layer scale starts near 0 (`grown_blocks`).
    "deep": SmallConvNeXtConfig(depths=(2, 2, 8, 2)),
    # For tests: a few milliseconds per step.
    "micro": SmallConvNeXtConfig(dims=(8, 16, 24, 32), depths=(1, 1, 1, 1)),
}
BACKBONES = tuple(SMALL_CONFIGS) + tuple(APPLICATIONS)

_BLOCK = re.compile(r"^s(\d+)b(\d+)_")


def block_of(path: str) -> tuple[int, int] | None:
    """(stage, block) of a ConvNeXt block's variable path (`s2b3_pw1/kernel`), else None."""
    m = _BLOCK.match(path)
    return (int(m.group(1)), int(m.group(2))) if m else None


def grown_blocks(saved: set[str], wanted: list[str]) -> list[tuple[int, int]]:
    """The ConvNeXt blocks (stage, block) of `wanted` (variable paths) that `saved` (a smaller network's paths)
    lacks, when they only lengthen its stages: block `s{stage}b{i}` with every block before it in
    that stage saved. Such a block starts as it is built, layer scale near 0, so it passes its
    input through and the grown network computes what the saved one did; training then puts it
    to use (net2net-style growth). Anything else missing is not growth: returns [] for it and the
    caller's shape check names it."""
    depth: dict[int, int] = {}
    for stage, block in filter(None, map(block_of, saved)):
        depth[stage] = max(depth.get(stage, 0), block + 1)
    new = {block_of(p) for p in wanted if p not in saved and block_of(p)}
    return [(stage, block) for stage, block in sorted(new)
            if stage in depth and block >= depth[stage]]


@keras.saving.register_keras_serializable(package="facewatch")
class LayerScale(layers.Layer):
    """Per-channel learnable scale on a residual branch (ConvNeXt's gamma), starting near 0."""

    def __init__(self, init_value: float = 1e-6, **kwargs):
        super().__init__(**kwargs)
        self.init_value = init_value

    def build(self, input_shape):
        self.gamma = self.add_weight(shape=(input_shape[-1],), name="gamma",
                                     initializer=keras.initializers.Constant(self.init_value))

    def call(self, x):
        return x * self.gamma

    def get_config(self):
        return {**super().get_config(), "init_value": self.init_value}


@keras.saving.register_keras_serializable(package="facewatch")
class StochasticDepth(layers.Layer):
    """Drops a whole residual branch per sample during training (regularises small data)."""

    def __init__(self, rate: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.rate = rate
        self.seed_generator = keras.random.SeedGenerator(1337)

    def call(self, x, training=None):
        if not training or self.rate <= 0.0:
            return x
        keep = 1.0 - self.rate
        shape = (ops.shape(x)[0],) + (1,) * (len(x.shape) - 1)
        mask = ops.floor(keep + keras.random.uniform(shape, seed=self.seed_generator))
        # x is bfloat16 under mixed precision; the draw stays float32 (the same masks either way).
        return x / keep * ops.cast(mask, x.dtype)

    def get_config(self):
        return {**super().get_config(), "rate": self.rate}


@keras.saving.register_keras_serializable(package="facewatch")
class GeluTanh(layers.Layer):
    """GELU in its tanh form: exact GELU lowers to Erfc, which tf2onnx cannot convert."""

    def call(self, x):
        return keras.activations.gelu(x, approximate=True)


@keras.saving.register_keras_serializable(package="facewatch")
class L2Normalize(layers.Layer):
    def call(self, x):
        return x / ops.sqrt(ops.maximum(ops.sum(ops.square(x), axis=-1, keepdims=True), 1e-12))


def _convnext_block(x, dim: int, drop_path: float, layer_scale_init: float, name: str):
    """Depthwise 7x7 -> LN -> Dense 4x -> GELU (tanh form) -> Dense -> layer scale, residual.

    DepthwiseConv2D and approximate GELU are what tf2onnx converts with no patch.
    """
    shortcut = x
    x = layers.DepthwiseConv2D(7, padding="same", name=f"{name}_dwconv")(x)
    x = layers.LayerNormalization(epsilon=1e-6, name=f"{name}_ln")(x)
    x = layers.Dense(4 * dim, name=f"{name}_pw1")(x)
    x = GeluTanh(name=f"{name}_gelu")(x)
    x = layers.Dense(dim, name=f"{name}_pw2")(x)
    x = LayerScale(layer_scale_init, name=f"{name}_scale")(x)
    if drop_path > 0:
        x = StochasticDepth(drop_path, name=f"{name}_droppath")(x)
    return layers.Add(name=f"{name}_add")([shortcut, x])


def small_convnext(inputs, config: SmallConvNeXtConfig):
    """Feature map of our ConvNeXt for 0..1-scaled inputs."""
    x = layers.Conv2D(config.dims[0], config.stem_stride, strides=config.stem_stride,
                      name="stem_conv")(inputs)
    x = layers.LayerNormalization(epsilon=1e-6, name="stem_ln")(x)
    total = sum(config.depths)
    block = 0
    for stage, (dim, depth) in enumerate(zip(config.dims, config.depths)):
        if stage > 0:
            x = layers.LayerNormalization(epsilon=1e-6, name=f"down{stage}_ln")(x)
            # 'same' keeps the odd 7x7 map at 4x4 instead of dropping a row and a column.
            x = layers.Conv2D(dim, 2, strides=2, padding="same", name=f"down{stage}_conv")(x)
        for i in range(depth):
            rate = config.drop_path * block / max(total - 1, 1)
            x = _convnext_block(x, dim, rate, config.layer_scale_init, f"s{stage}b{i}")
            block += 1
    return layers.LayerNormalization(epsilon=1e-6, name="final_ln")(x)


# ImageNet statistics that keras.applications ConvNeXt normalises with, in 0..255 units.
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def application_convnext(inputs, backbone: str, weights: str | None, input_size: int = INPUT_SIZE):
    """keras.applications ConvNeXt feature map for 0..255 RGB inputs.

    Its own `Normalization` layer keeps mean/variance as tensors made outside the traced
    graph, which tf2onnx turns into extra model inputs; the same normalisation as a per-channel
    `Rescaling` (Python lists, so constants inside the graph) exports cleanly.
    """
    cls = getattr(keras.applications, APPLICATIONS[backbone])
    net = cls(include_top=False, weights=None, input_shape=(input_size, input_size, 3),
              include_preprocessing=False)
    if weights:
        # Local ImageNet file only: nothing can be downloaded on these machines.
        net.load_weights(weights)
    x = layers.Rescaling(scale=[1.0 / s for s in IMAGENET_STD],
                         offset=[-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)],
                         name="imagenet_normalisation")(inputs)
    return net(x)


def build_embedder(backbone: str = "small", embedding_size: int = 128, dropout: float = 0.2,
                   weights: str | None = None, drop_path: float = 0.05,
                   input_size: int = INPUT_SIZE) -> keras.Model:
    """Embedding network: (N, S, S, 3) float 0..255 RGB -> (N, embedding_size) unit vectors,
    S = `input_size` (112; 96 maps the small ConvNeXt to a 3x3 final map).

    The head flattens the final map instead of pooling it: the position of eyes, nose and mouth
    is what tells faces apart, and global pooling would throw it away (ArcFace's "E" head).

    Under a mixed-precision global policy (`keras.mixed_precision`: the training-speed
    benchmark's bf16 variants), the projection's BatchNorm and the L2 step still run in float32
    (the losses compare cosines to 1e-3). train-embedder itself trains in float32: bf16 did not
    pay on this CPU (models/README.md, "Training speed on the CPU").
    """
    if backbone not in BACKBONES:
        raise ValueError(f"backbone must be one of {BACKBONES}, got {backbone!r}")
    if input_size < 32:
        raise ValueError(f"input_size must be >= 32, got {input_size}")
    inputs = keras.Input((input_size, input_size, 3), name="image")
    if backbone in SMALL_CONFIGS:
        if weights:
            raise ValueError(f"--weights is for keras.applications backbones, not {backbone!r}")
        config = SMALL_CONFIGS[backbone]
        if drop_path and backbone != "micro":
            config = SmallConvNeXtConfig(**{**config.__dict__, "drop_path": drop_path})
        features = small_convnext(layers.Rescaling(1.0 / 255.0, name="rescale")(inputs), config)
    else:
        features = application_convnext(inputs, backbone, weights, input_size)
    x = layers.Flatten(name="flatten")(features)
    x = layers.Dropout(dropout, name="dropout")(x)
    x = layers.Dense(embedding_size, use_bias=False, name="projection")(x)
    x = layers.BatchNormalization(name="projection_bn", dtype="float32")(x)
    outputs = L2Normalize(name="embedding", dtype="float32")(x)
    return keras.Model(inputs, outputs, name=f"embedder_{backbone}")


class EmbedderTrainer(keras.Model):
    """Training wrapper: the embedding network plus whatever the loss needs (ArcFace centres).

    `call` returns embeddings; `compute_loss` turns them and the identity labels into the loss,
    so Keras' own train step (any backend) does the rest. Save `.embedder` for inference.
    """

    def __init__(self, embedder: keras.Model, loss: str = "arcface", num_classes: int = 0,
                 arc_scale: float = 32.0, arc_margin: float = 0.4, triplet_margin: float = 0.3,
                 mining: str = "semi-hard", contrastive_margin: float = 1.0,
                 distill_weight: float = 0.0, relation_weight: float = 0.0,
                 identity_weight: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        # With a teacher, targets are (labels, teacher embeddings) and the loss adds
        # distillation_loss; without, targets are the labels alone. Rows labelled -1 (faces
        # without identity) count in the distillation loss only (ArcFace masks them; the
        # triplet and contrastive losses do not, so train_embedder refuses that combination).
        self.distill_weight, self.relation_weight = distill_weight, relation_weight
        # 0: the identity loss is left out (distillation only; the ArcFace head stays, untrained,
        # so a run can be resumed or initialised either way).
        self.identity_weight = identity_weight
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        self.embedder = embedder
        self.loss_name, self.mining = loss, mining
        self.triplet_margin, self.contrastive_margin = triplet_margin, contrastive_margin
        self.head = None
        if loss == "arcface":
            if num_classes < 2:
                raise ValueError(f"ArcFace needs >= 2 identities, got {num_classes}")
            # float32 whatever the global policy: s * cos(theta + m) in bfloat16 (8-bit mantissa)
            # would blur the margin itself.
            self.head = ArcMarginHead(num_classes, arc_scale, arc_margin, name="arcface",
                                      dtype="float32")
            self.head.build((None, embedder.output.shape[-1]))

    def call(self, images, training=False):
        return self.embedder(images, training=training)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        teacher = None
        if isinstance(y, (tuple, list)):
            y, teacher = y
        loss = 0.0
        if self.identity_weight:
            loss = self.identity_weight * self._identity_loss(y, y_pred)
        if teacher is not None:
            loss = loss + distillation_loss(y_pred, teacher, self.distill_weight, self.relation_weight)
        if self.losses:
            loss = loss + ops.sum(ops.stack([ops.sum(l) for l in self.losses]))
        return loss

    def _identity_loss(self, y, y_pred):
        if self.loss_name == "arcface":
            loss = arcface_loss(self.head(y_pred, y), y)
        elif self.loss_name == "triplet":
            loss = triplet_loss(y_pred, y, self.triplet_margin, self.mining)
        else:
            loss = contrastive_loss(y_pred, y, self.contrastive_margin)
        return loss
