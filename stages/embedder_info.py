"""What the detect and match stages (and the supervisor's checks) need from the embedder file:
its metadata, read without onnxruntime, without the onnx package and without loading the graph.

Light on purpose: the supervisor imports it to check the models before anything starts, and
every import here is RSS in each process that makes it.
"""
from __future__ import annotations

import ast
import io
import json
from dataclasses import dataclass
from pathlib import Path

from facewatch.stages.errors import ModelError
from facewatch.stages.open_set import METADATA_KEY, FarTable


@dataclass(frozen=True)
class EmbedderInfo:
    input_size: int
    crop_scale: float
    threshold: float
    # How its training crops were made; models exported before alignment existed say nothing.
    crop_alignment: str = "box"
    # The best pair-accuracy threshold (`threshold` is the stricter FAR 1e-3 one); older files
    # have only `threshold`.
    pair_accuracy_threshold: float | None = None
    # Impostor pair FAR -> threshold (stages.open_set), for the open-set operating point.
    far_table: object | None = None

    def crop_spec(self, size: int | None = None, scale: float | None = None):
        """The crop this embedder wants (stages.face_crop.CropSpec), with the config's overrides
        (None: the model's)."""
        from facewatch.stages.face_crop import CropSpec

        return CropSpec(size or self.input_size, self.crop_alignment, scale or self.crop_scale)


def _decode(value: str):
    try:
        return json.loads(value)
    except ValueError:
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value


def _varint(f) -> int:
    result = shift = 0
    while True:
        byte = f.read(1)
        if not byte:
            raise ValueError("the file ends inside a field")
        result |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return result
        shift += 7
        if shift > 63:
            raise ValueError("malformed varint")


def _entry(data: bytes) -> tuple[str, str]:
    """One StringStringEntryProto: field 1 key, field 2 value."""
    buf, out = io.BytesIO(data), {1: "", 2: ""}
    while buf.tell() < len(data):
        tag = _varint(buf)
        if tag & 7 != 2:
            raise ValueError("malformed metadata entry")
        out[tag >> 3] = buf.read(_varint(buf)).decode("utf-8")
    return out[1], out[2]


def read_onnx_metadata(path: Path) -> dict[str, str]:
    """ModelProto.metadata_props (field 14) read by walking the file's top-level protobuf fields
    and seeking over the others. onnx.load would parse the whole graph and its weights (+~40 MB
    of RSS kept by the detect and match stages, which only need these strings)."""
    size = Path(path).stat().st_size
    meta: dict[str, str] = {}
    seen: set[int] = set()
    with open(path, "rb") as f:
        while f.tell() < size:
            tag = _varint(f)
            field, wire = tag >> 3, tag & 7
            if field == 0:
                raise ValueError("field number 0")
            seen.add(field)
            if wire == 0:
                _varint(f)
            elif wire in (1, 5):
                f.seek(8 if wire == 1 else 4, 1)
            elif wire == 2:
                length = _varint(f)
                if f.tell() + length > size:
                    raise ValueError("a field runs past the end of the file (truncated?)")
                if field == 14:
                    key, value = _entry(f.read(length))
                    meta[key] = value
                else:
                    f.seek(length, 1)
            else:
                raise ValueError(f"wire type {wire}")
        if f.tell() != size:
            raise ValueError("the last field runs past the end of the file (truncated?)")
    if 7 not in seen:   # ModelProto.graph
        raise ValueError("no graph")
    return meta


def read_embedder_info(path: Path) -> EmbedderInfo:
    """Crop geometry and suggested threshold from the embedder file's metadata, without starting
    an inference session or loading the graph (detect and match need them, not the model)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"face embedder file not found: {path}")
    try:
        meta = {k: _decode(v) for k, v in read_onnx_metadata(path).items()}
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        raise ModelError(f"face embedder {path} is not an ONNX model: {exc}") from exc
    if "facewatch_embedder" not in meta:
        raise ModelError(f"face embedder {path}: no facewatch_embedder metadata; export it with "
                         f"`facewatch export-embedder`")
    size = meta.get("input_size")
    if size is None:   # older exports: from the graph's input (this loads the whole model)
        import onnx

        dims = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
        size = dims[1].dim_value
    pair = meta.get("pair_accuracy_threshold")
    table = None
    if meta.get(METADATA_KEY) is not None:
        try:
            table = FarTable.from_metadata(meta[METADATA_KEY])
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"face embedder {path}: unreadable {METADATA_KEY} metadata: {exc}") from exc
    if "crop_scale" in meta:
        crop_scale = float(meta["crop_scale"])
    else:
        from facewatch.stages.face_crop import DEFAULT_CROP_SCALE

        crop_scale = DEFAULT_CROP_SCALE
    return EmbedderInfo(int(size), crop_scale,
                        float(meta.get("threshold", 0.5)), str(meta.get("crop_alignment", "box")),
                        None if pair is None else float(pair), table)
