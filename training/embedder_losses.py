"""Metric-learning losses on unit embeddings, in `keras.ops` only (TensorFlow and PyTorch backends).

- ArcFace: additive angular margin over identity class centres (`ArcMarginHead` holds them).
- Triplet: online mining inside the batch, `semi-hard` (FaceNet) or `hard` (batch-hard).
- Contrastive: every pair in the batch, positives pulled together, negatives pushed past a margin.

Batches for the triplet and contrastive losses must hold several images per identity
(see `embedder_data.IdentityBatches`).
"""
from __future__ import annotations

import math

import keras
from keras import ops

LOSSES = ("arcface", "triplet", "contrastive")
MININGS = ("semi-hard", "hard")


@keras.saving.register_keras_serializable(package="facewatch")
class ArcMarginHead(keras.layers.Layer):
    """Logits s*cos(theta + m) for the true class and s*cos(theta) for the others.

    The class centres are trained with the network and thrown away after training.
    """

    def __init__(self, num_classes: int, scale: float = 32.0, margin: float = 0.4, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 < margin < math.pi / 2:
            raise ValueError(f"margin must be in (0, pi/2) radians, got {margin}")
        self.num_classes, self.scale, self.margin = num_classes, scale, margin

    def build(self, input_shape):
        self.centres = self.add_weight(shape=(input_shape[-1], self.num_classes), name="centres",
                                       initializer=keras.initializers.GlorotNormal())
        # 0..1 factor on the margin, raised by the training schedule: from scratch, the full
        # margin at once keeps a small network from converging (plain softmax first).
        self.margin_ramp = self.add_weight(shape=(), name="margin_ramp", trainable=False,
                                           initializer="ones")

    def call(self, embeddings, labels):
        w = self.centres / ops.sqrt(ops.maximum(ops.sum(ops.square(self.centres), axis=0,
                                                        keepdims=True), 1e-12))
        cos = ops.clip(ops.matmul(embeddings, w), -1.0 + 1e-7, 1.0 - 1e-7)
        sin = ops.sqrt(1.0 - ops.square(cos))
        m = self.margin * self.margin_ramp
        cos_m = cos * ops.cos(m) - sin * ops.sin(m)
        # Past theta = pi - m, cos(theta + m) is no longer decreasing in theta; fall back to a
        # linear penalty there (as insightface does) so the gradient keeps its sign.
        cos_m = ops.where(cos > -ops.cos(m), cos_m, cos - ops.sin(m) * m)
        # Rows labelled -1 (faces without identity) get class 0's margin here; arcface_loss
        # leaves them out, so what they get does not matter.
        labels = ops.maximum(ops.cast(ops.reshape(labels, (-1,)), "int32"), 0)
        onehot = ops.one_hot(labels, self.num_classes)
        return self.scale * (onehot * cos_m + (1.0 - onehot) * cos)

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "scale": self.scale,
                "margin": self.margin}


def arcface_loss(logits, labels):
    """Mean cross-entropy over the labelled rows. Rows labelled -1 are faces without identity
    (they train the distillation loss only): they add nothing, and the mean is over the others."""
    labels = ops.cast(ops.reshape(labels, (-1,)), "int32")
    labelled = ops.cast(labels >= 0, "float32")
    per_row = keras.losses.sparse_categorical_crossentropy(ops.maximum(labels, 0), logits,
                                                          from_logits=True)
    return ops.sum(per_row * labelled) / ops.maximum(ops.sum(labelled), 1.0)


def _pairwise(embeddings, labels):
    """Euclidean distances between unit vectors, same-identity mask and positive-pair mask."""
    sim = ops.matmul(embeddings, ops.transpose(embeddings))
    dist = ops.sqrt(ops.maximum(2.0 - 2.0 * sim, 1e-12))
    labels = ops.reshape(labels, (-1, 1))
    same = ops.cast(ops.equal(labels, ops.transpose(labels)), "float32")
    not_self = 1.0 - ops.eye(ops.shape(embeddings)[0], dtype="float32")
    return dist, same, same * not_self


def triplet_loss(embeddings, labels, margin: float = 0.3, mining: str = "semi-hard"):
    """Online triplet loss on euclidean distances of unit vectors (range 0..2)."""
    if mining not in MININGS:
        raise ValueError(f"mining must be one of {MININGS}, got {mining!r}")
    dist, same, positive = _pairwise(embeddings, labels)
    negative = 1.0 - same
    big = 4.0  # larger than any distance between unit vectors
    if mining == "hard":
        hardest_pos = ops.max(dist * positive, axis=1)
        hardest_neg = ops.min(dist + big * same, axis=1)
        valid = ops.cast(ops.sum(positive, axis=1) > 0, "float32")
        per_anchor = ops.relu(hardest_pos - hardest_neg + margin) * valid
        return ops.sum(per_anchor) / ops.maximum(ops.sum(valid), 1.0)
    # Semi-hard: for each (anchor a, positive p) the closest negative farther than p; if there is
    # none, the farthest negative (FaceNet, as in tfa.losses.triplet_semihard_loss).
    d_ap = ops.expand_dims(dist, 2)                   # [a, p, 1]
    d_an = ops.expand_dims(dist, 1)                   # [a, 1, n]
    neg = ops.expand_dims(negative, 1)                # [a, 1, n]
    outside = neg * ops.cast(d_an > d_ap, "float32")  # [a, p, n]
    has_outside = ops.sum(outside, axis=2) > 0
    closest_outside = ops.min(d_an + big * (1.0 - outside), axis=2)
    farthest = ops.max(dist * negative, axis=1, keepdims=True)  # [a, 1]
    chosen = ops.where(has_outside, closest_outside, farthest)
    losses = ops.relu(dist - chosen + margin) * positive
    return ops.sum(losses) / ops.maximum(ops.sum(positive), 1.0)


def contrastive_loss(embeddings, labels, margin: float = 1.0):
    """Mean of d^2 over positive pairs plus mean of relu(margin - d)^2 over negative pairs."""
    dist, same, positive = _pairwise(embeddings, labels)
    negative = 1.0 - same
    pos = ops.sum(positive * ops.square(dist)) / ops.maximum(ops.sum(positive), 1.0)
    neg = ops.sum(negative * ops.square(ops.relu(margin - dist))) / ops.maximum(ops.sum(negative), 1.0)
    return 0.5 * (pos + neg)


def distillation_loss(student, teacher, embedding_weight: float = 1.0, relation_weight: float = 1.0):
    """How far the student's unit embeddings are from the teacher's (both (B, D), same D).

    Two terms: 1 - cosine between each face's student and teacher vector (the student learns the
    teacher's space itself, so it inherits what 3 M faces taught dlib), and the mean squared
    difference of the batch's pairwise cosine similarities (the geometry between faces, which
    still teaches when the first term cannot be met exactly).
    """
    teacher = ops.convert_to_tensor(teacher, "float32")
    direct = ops.mean(1.0 - ops.sum(student * teacher, axis=1))
    s_rel = ops.matmul(student, ops.transpose(student))
    t_rel = ops.matmul(teacher, ops.transpose(teacher))
    n = ops.cast(ops.shape(student)[0], "float32")
    off_diagonal = 1.0 - ops.eye(ops.shape(student)[0], dtype="float32")
    relation = ops.sum(off_diagonal * ops.square(s_rel - t_rel)) / ops.maximum(n * (n - 1.0), 1.0)
    return embedding_weight * direct + relation_weight * relation
