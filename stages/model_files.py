"""Where the shipped models are: found without a path in the config.

The wheel installs `face_detector.onnx`, `face_embedder.onnx`, `face_landmarks.onnx` (and the
model card) under `<prefix>/share/facewatch/models` (pyproject.toml's data files): in a venv
`/opt/facewatch/.venv/share/facewatch/models`. The models directory is, first found:

1. `$FACEWATCH_MODELS`, when set (a folder with the three files);
2. `models/` of the source checkout this code runs from (a `git clone`, `pip install -e .`);
3. the installed data directory, located through the package's installed file list (so a
   `--user` or `--prefix` install is found as well as a venv).

A config that names no model file uses the file of that name in this directory.
"""
from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path

DETECTOR = "face_detector.onnx"
EMBEDDER = "face_embedder.onnx"
LANDMARKS = "face_landmarks.onnx"
DATA_SUBDIR = Path("share") / "facewatch" / "models"
ENV = "FACEWATCH_MODELS"
_CHECKOUT = Path(__file__).resolve().parent.parent


def _installed_dirs() -> list[Path]:
    out: list[Path] = []
    try:
        from importlib.metadata import PackageNotFoundError, distribution

        dist = distribution("facewatch")
        for f in dist.files or ():
            if f.name == EMBEDDER and Path(*f.parts[-4:-1]) == DATA_SUBDIR:
                out.append(Path(dist.locate_file(f)).resolve().parent)
    except (ImportError, PackageNotFoundError):
        pass
    out += [Path(sysconfig.get_path("data")) / DATA_SUBDIR, Path(sys.prefix) / DATA_SUBDIR]
    return out


def candidate_dirs() -> list[Path]:
    """Where the shipped models are looked for, in order."""
    out = [Path(os.environ[ENV])] if os.environ.get(ENV) else []
    if (_CHECKOUT / "pyproject.toml").is_file():
        out.append(_CHECKOUT / "models")
    for d in _installed_dirs():
        if d not in out:
            out.append(d)
    return out


def models_dir() -> Path:
    """$FACEWATCH_MODELS when set, else the first candidate that holds the embedder (else the
    first candidate: a path that errors name)."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    dirs = candidate_dirs()
    for d in dirs:
        if (d / EMBEDDER).is_file():
            return d
    return dirs[0]


def shipped_model(name: str) -> Path:
    return models_dir() / name


def where_text() -> str:
    """For error messages: where the shipped models were looked for."""
    return ", ".join(str(d) for d in candidate_dirs())
