"""WIDER FACE in the shared layout: the fixed event-class split and a checked ultralytics dataset.

The shared copy has `images/<event>/<name>.jpg` and YOLO labels in `labels/<event>/<name>.txt`.
The split is by event class (no scene type appears on both sides) and is committed in
`training/splits/widerface_split.json`, so every run and every report uses the same images.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from facewatch.training.paths import SPLITS_DIR, require_dir

SPLIT_FILE = SPLITS_DIR / "widerface_split.json"
# Every 5th event class (by its WIDER number) is held out for validation: 13 of 61 classes.
VAL_EVENT_STRIDE = 5


def _event_number(event: str) -> int:
    return int(event.split("--", 1)[0])


def make_split(root: Path) -> dict:
    """Build the split from the folder; used once to write SPLIT_FILE, kept for reproducibility."""
    events = sorted((p.name for p in (root / "images").iterdir() if p.is_dir()), key=_event_number)
    val_events = [e for e in events if _event_number(e) % VAL_EVENT_STRIDE == 2]
    split: dict = {"rule": f"event number % {VAL_EVENT_STRIDE} == 2 -> val", "train": [], "val": []}
    for event in events:
        side = "val" if event in val_events else "train"
        split[side].extend(sorted(f"{event}/{p.name}" for p in (root / "images" / event).glob("*.jpg")))
    split["val_events"] = val_events
    return split


def load_split(path: Path = SPLIT_FILE) -> dict:
    try:
        split = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"split file {path} unreadable: {exc}") from exc
    if not isinstance(split.get("train"), list) or not isinstance(split.get("val"), list):
        raise ValueError(f"split file {path}: expected JSON with 'train' and 'val' lists of "
                         f"'<event>/<image>.jpg' paths")
    return split


@dataclass
class CheckedImages:
    good: list[Path] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # relative path -> reason


def _label_problem(label: Path) -> str | None:
    if not label.is_file():
        return "no label file"
    try:
        rows = [line.split() for line in label.read_text().splitlines() if line.strip()]
        values = np.array(rows, dtype=np.float64).reshape(-1, 5) if rows else np.zeros((0, 5))
    except (ValueError, UnicodeDecodeError) as exc:
        return f"unparsable label ({exc.__class__.__name__})"
    if len(values) and (np.any(values[:, 0] != 0) or np.any(values[:, 1:] < 0)
                        or np.any(values[:, 1:] > 1.0001)):
        return "label values outside class 0 / [0, 1]"
    return None


def check_images(root: Path, relative: list[str]) -> CheckedImages:
    """Keep images that decode and whose labels parse; count and name the rest."""
    result = CheckedImages()
    for rel in relative:
        image = root / "images" / rel
        label = (root / "labels" / rel).with_suffix(".txt")
        problem = _label_problem(label)
        if problem is None and cv2.imread(str(image), cv2.IMREAD_REDUCED_COLOR_8) is None:
            problem = "image does not decode"
        if problem:
            result.skipped[rel] = problem
        else:
            result.good.append(image)
    return result


def write_dataset_yaml(root: Path, out_dir: Path, split_file: Path = SPLIT_FILE) -> tuple[Path, dict]:
    """Write train/val lists and the ultralytics data YAML; return it and the skip report."""
    require_dir(root / "images", "WIDER FACE images folder")
    require_dir(root / "labels", "WIDER FACE labels folder")
    split = load_split(split_file)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {}
    for side in ("train", "val"):
        checked = check_images(root, split[side])
        (out_dir / f"{side}.txt").write_text("".join(f"{p}\n" for p in checked.good))
        if not checked.good:
            raise ValueError(f"no usable {side} images under {root / 'images'} (from {split_file})")
        report[side] = {"images": len(checked.good), "skipped": len(checked.skipped),
                        "skipped_reasons": checked.skipped}
    data_yaml = out_dir / "widerface.yaml"
    data_yaml.write_text(
        f"path: {out_dir}\ntrain: {out_dir / 'train.txt'}\nval: {out_dir / 'val.txt'}\n"
        "names:\n  0: face\n")
    return data_yaml, report


if __name__ == "__main__":  # regenerate the committed split (only if the data folder changes)
    from facewatch.training.paths import shared_data_dir

    SPLIT_FILE.parent.mkdir(parents=True, exist_ok=True)
    SPLIT_FILE.write_text(json.dumps(make_split(shared_data_dir() / "widerface"), indent=1) + "\n")
