"""Write custom metadata into an ONNX file (values JSON-encoded), keeping what is there."""
from __future__ import annotations

import json
import os
from pathlib import Path

import onnx


def set_metadata(path: Path, values: dict) -> None:
    model = onnx.load(str(path))
    existing = {p.key: p for p in model.metadata_props}
    for key, value in values.items():
        text = value if isinstance(value, str) else json.dumps(value)
        prop = existing.get(key) or model.metadata_props.add()
        prop.key, prop.value = key, text
    tmp = Path(f"{path}.tmp")
    onnx.save(model, str(tmp))
    os.replace(tmp, path)  # never leave a half-written model behind
