"""The face embedder as the daemon runs it: an ONNX ConvNeXt twin on onnxruntime.

Everything the runtime needs (input size, normalisation, crop scale, suggested threshold) is
read from the model's metadata, written there by `export/embedder_onnx.py`.
"""
from __future__ import annotations

import numpy as np

from facewatch.stages.face_crop import DEFAULT_CROP_SCALE, CropSpec
from facewatch.stages.gallery import file_model_id
from facewatch.stages.onnx_session import DEFAULT_PROVIDERS, ModelError, load_session, metadata


def _quantized(model_path) -> bool:
    from facewatch.stages.embedder_info import read_onnx_metadata

    try:
        return "quantization" in read_onnx_metadata(model_path)
    except (OSError, ValueError):   # load_session says what is wrong with the file
        return False


class FaceEmbedder:
    def __init__(self, model_path, providers=DEFAULT_PROVIDERS, threads: int = 0,
                 flip_average: bool | None = None, spin: bool = False):
        # onnxruntime's CPU arena: ~20% faster batches for the fp32 embedder; for an int8 copy no
        # faster, and it keeps ~80 MB more after a large batch (measured, 2 CPU cores)
        self.session = load_session(model_path, providers, threads, what="face embedder",
                                    cpu_arena=not _quantized(model_path), spin=spin)
        self.meta = metadata(self.session)
        # Gallery rows remember which model made them: embeddings of two models don't compare.
        # An int8 copy (`facewatch quantize-model`) names its parent's embedding space instead.
        self.model_id = str(self.meta.get("embedding_space") or file_model_id(model_path))
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4 or inputs[0].shape[3] != 3:
            raise ModelError(f"face embedder {model_path}: expected one input [N, H, W, 3], got "
                             f"{[(i.name, i.shape) for i in inputs]}")
        if len(outputs) != 1 or len(outputs[0].shape) != 2:
            raise ModelError(f"face embedder {model_path}: expected one output [N, D], got "
                             f"{[(o.name, o.shape) for o in outputs]}")
        if "facewatch_embedder" not in self.meta:
            raise ModelError(f"face embedder {model_path}: no facewatch_embedder metadata; export it "
                             f"with `facewatch export-embedder`")
        self.input_name = inputs[0].name
        self.input_size = int(self.meta.get("input_size", inputs[0].shape[1]))
        self.embedding_size = int(self.meta.get("embedding_size", outputs[0].shape[1]))
        self.crop_scale = float(self.meta.get("crop_scale", DEFAULT_CROP_SCALE))
        # Models exported before five-point alignment existed were trained on box crops.
        self.crop_spec = CropSpec(self.input_size, str(self.meta.get("crop_alignment", "box")),
                                  self.crop_scale)
        self.threshold = float(self.meta.get("threshold", 0.5))
        self.channel_order = str(self.meta.get("channel_order", "RGB"))
        # Averaging the embeddings of a face and its mirror image is cheap accuracy; the metadata
        # records whether the suggested threshold was chosen with it.
        self.flip_average = bool(self.meta.get("flip_average", True) if flip_average is None
                                 else flip_average)
        self.provider = self.session.get_providers()[0]

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: batch})[0]

    def embed(self, crops: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) uint8 BGR crops from `crop_faces(.., self.crop_spec, ..)` -> (N, D) float32
        unit vectors."""
        if crops.ndim != 4 or crops.shape[1:] != (self.input_size, self.input_size, 3):
            raise ValueError(f"crops must be (N, {self.input_size}, {self.input_size}, 3), "
                             f"got {crops.shape}")
        if len(crops) == 0:
            return np.zeros((0, self.embedding_size), np.float32)
        batch = crops[..., ::-1] if self.channel_order == "RGB" else crops
        batch = np.ascontiguousarray(batch, dtype=np.float32)  # normalisation is inside the graph
        emb = self._run(batch)
        if self.flip_average:
            emb = emb + self._run(np.ascontiguousarray(batch[:, :, ::-1]))
        norm = np.linalg.norm(emb, axis=1, keepdims=True)
        return (emb / np.maximum(norm, 1e-12)).astype(np.float32)


def embedder_from_config(models) -> FaceEmbedder:
    """The embedder as the daemon runs it from its `models` config section: the float file or
    its int8 copy (models.precision, stages.precision), providers, threads."""
    from facewatch.stages.precision import choose, load

    choice = choose(models, "embedder")
    embedder = load(choice, models.embedder,
                    lambda path: FaceEmbedder(path, models.providers, models.threads,
                                                     spin=models.spin_wait))
    embedder.choice = choice
    return embedder
