"""Five-point landmark pseudo-labels for WIDER FACE, from dlib's 5-point model, computed once.

`labeller="yunet"` labels the same boxes with YuNet's five points instead (eye centres, nose tip,
mouth corners: the ArcFace layout, `training.sface_teacher.SFaceTeacher.face_in_box`); a box where
YuNet finds no overlapping face gets NaN points, hence visibility 0.

WIDER FACE has boxes only. For every face box of the split's train and val images (the boxes of
the YOLO labels the detector trains on) dlib's shape predictor, run inside the box, gives five
points in dlib's order (`training.dlib_teacher.LANDMARK_NAMES`). A face gets visibility 0 when

- its box is under `MIN_FACE_PX` pixels tall: dlib's predictor regresses the points from pixel
  differences inside the box; at 16 px the eye corners are 2 px apart and the whole eye region
  is about 3 px tall, so the points are guesses at the box's average layout, not measurements
  (and the detector, trained at 320 on 1024 px images, sees such a face at about 5 px);
- or `stages.face_crop.landmarks_plausible` rejects the points (eyes swapped or collapsed, nose
  above the eyes, points far outside the box): dlib failed on that face (profile, occlusion).

A visible face's single points that fall outside the image get visibility 0 on their own
(ultralytics refuses coordinates outside [0, 1]).

The cache (`runs/landmarks/widerface-dlib5-<key>.npz`) is keyed by the image list, the labels'
content and the threshold, so it is built once per split.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from facewatch.training.paths import runs_dir

log = logging.getLogger("facewatch.widerface_landmarks")

MIN_FACE_PX = 16.0
NUM_LANDMARKS = 5


@dataclass(frozen=True)
class LandmarkLabels:
    """Per-image face boxes (pixels, from the YOLO labels), landmarks and visibility."""
    images: list[str]            # "<event>/<name>.jpg", relative to the images folder
    offsets: np.ndarray          # (len(images) + 1,) int64: faces of image i are rows offsets[i]:offsets[i+1]
    sizes: np.ndarray            # (len(images), 2) int32 image (height, width)
    boxes: np.ndarray            # (F, 4) float32 x1, y1, x2, y2 pixels
    points: np.ndarray           # (F, 5, 2) float32 pixels, dlib's order
    visible: np.ndarray          # (F,) bool: the face's points are usable labels
    reasons: dict                # counts: too_small, implausible, visible

    def image(self, rel: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        i = self._index()[rel]
        s = slice(int(self.offsets[i]), int(self.offsets[i + 1]))
        return self.boxes[s], self.points[s], self.visible[s]

    def _index(self) -> dict[str, int]:
        cached = self.__dict__.get("_idx")
        if cached is None:
            cached = {rel: i for i, rel in enumerate(self.images)}
            object.__setattr__(self, "_idx", cached)
        return cached

    def __contains__(self, rel: str) -> bool:
        return rel in self._index()


def read_yolo_boxes(label: Path, width: int, height: int) -> np.ndarray:
    """(N, 4) pixel x1y1x2y2 boxes of a one-class YOLO label file."""
    rows = [line.split() for line in label.read_text().splitlines() if line.strip()]
    values = np.array(rows, np.float64).reshape(-1, 5)[:, 1:] if rows else np.zeros((0, 4))
    cx, cy, w, h = values.T * [[width], [height], [width], [height]]
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1).astype(np.float32)


LABELLERS = {"dlib": "dlib", "yunet": "arcface"}   # labeller -> landmark layout


def visibility(points: np.ndarray, boxes: np.ndarray, min_face_px: float = MIN_FACE_PX,
               layout: str = "dlib") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(visible, too_small, implausible) bool arrays for (N, 5, 2) points in (N, 4) boxes."""
    from facewatch.stages.face_crop import landmarks_plausible

    too_small = (boxes[:, 3] - boxes[:, 1]) < min_face_px
    implausible = np.array([not too_small[i] and not landmarks_plausible(points[i], boxes[i], layout)
                            for i in range(len(boxes))], bool)
    return ~too_small & ~implausible, too_small, implausible


def _cache_path(root: Path, rels: list[str], min_face_px: float, labeller: str = "dlib") -> Path:
    digest = hashlib.sha1()
    settings = {"root": str(Path(root).resolve()), "min_face_px": min_face_px, "version": 1}
    if labeller != "dlib":   # dlib's caches keep their names
        settings["labeller"] = labeller
    digest.update(json.dumps(settings).encode())
    for rel in rels:
        digest.update(rel.encode())
        label = (Path(root) / "labels" / rel).with_suffix(".txt")
        digest.update(label.read_bytes() if label.is_file() else b"-")
    return runs_dir() / "landmarks" / f"widerface-{labeller}5-{digest.hexdigest()[:16]}.npz"


def _load(path: Path) -> LandmarkLabels:
    with np.load(path, allow_pickle=False) as z:
        return LandmarkLabels([str(s) for s in z["images"]], z["offsets"], z["sizes"], z["boxes"],
                              z["points"], z["visible"], json.loads(str(z["reasons"])))


def _labeller(name: str):
    """frame (BGR), boxes (K, 4) -> (K, 5, 2) points in the labeller's layout (NaN: none found)."""
    if name == "dlib":
        from facewatch.training.dlib_teacher import DlibTeacher

        teacher = DlibTeacher(embeddings=False)
        return lambda frame, boxes: teacher.landmarks(frame[..., ::-1], boxes)
    if name == "yunet":
        from facewatch.training.sface_teacher import SFaceTeacher

        yunet = SFaceTeacher(embeddings=False)

        def label(frame, boxes):
            out = np.full((len(boxes), 5, 2), np.nan, np.float32)
            for i, box in enumerate(boxes):
                face = yunet.face_in_box(frame, box)
                if face is not None:
                    out[i] = face[1]
            return out
        return label
    raise ValueError(f"landmark labeller must be one of {tuple(LABELLERS)}, got {name!r}")


def build_landmark_labels(root: Path, rels: list[str], min_face_px: float = MIN_FACE_PX,
                          progress: bool = True, labeller: str = "dlib") -> LandmarkLabels:
    """Run dlib (or YuNet) on every labelled face of `rels` (images that do not decode or have no
    label are left out: `training.widerface.check_images` skips them too)."""
    place = _labeller(labeller)
    kept, offsets, sizes, boxes, points = [], [0], [], [], []
    start = time.monotonic()
    for n, rel in enumerate(rels, 1):
        frame = cv2.imread(str(Path(root) / "images" / rel))
        label = (Path(root) / "labels" / rel).with_suffix(".txt")
        if frame is None or not label.is_file():
            continue
        h, w = frame.shape[:2]
        try:
            b = read_yolo_boxes(label, w, h)
        except ValueError:
            continue
        p = place(frame, b) if len(b) else np.zeros((0, 5, 2), np.float32)
        kept.append(rel)
        sizes.append((h, w))
        boxes.append(b)
        points.append(p)
        offsets.append(offsets[-1] + len(b))
        if progress and (n % 200 == 0 or n == len(rels)):
            print(f"  landmarks: {n}/{len(rels)} images, {offsets[-1]} faces, "
                  f"{time.monotonic() - start:.0f} s", flush=True)
    boxes = np.concatenate(boxes) if boxes else np.zeros((0, 4), np.float32)
    points = np.concatenate(points) if points else np.zeros((0, 5, 2), np.float32)
    visible, too_small, implausible = visibility(points, boxes, min_face_px, LABELLERS[labeller])
    reasons = {"labeller": labeller, "layout": LABELLERS[labeller],
               "faces": len(boxes), "visible": int(visible.sum()), "too_small": int(too_small.sum()),
               "implausible": int(implausible.sum()), "min_face_px": min_face_px,
               "seconds": round(time.monotonic() - start, 1)}
    return LandmarkLabels(kept, np.array(offsets, np.int64), np.array(sizes, np.int32).reshape(-1, 2),
                          boxes.astype(np.float32), points.astype(np.float32), visible, reasons)


def load_landmark_labels(root: Path, rels: list[str], min_face_px: float = MIN_FACE_PX,
                         labeller: str = "dlib") -> LandmarkLabels:
    """The cached pseudo-labels of `rels`, computing (and caching) them on the first call."""
    if labeller not in LABELLERS:
        raise ValueError(f"landmark labeller must be one of {tuple(LABELLERS)}, got {labeller!r}")
    path = _cache_path(root, rels, min_face_px, labeller)
    if path.is_file():
        labels = _load(path)
    else:
        print(f"landmark pseudo-labels: {labeller} 5-point on {len(rels)} images (once; cached in "
              f"{path})", flush=True)
        labels = build_landmark_labels(root, rels, min_face_px, labeller=labeller)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, images=np.array(labels.images), offsets=labels.offsets,
                            sizes=labels.sizes, boxes=labels.boxes, points=labels.points,
                            visible=labels.visible, reasons=json.dumps(labels.reasons))
        tmp.replace(path)
    r = labels.reasons
    print(f"landmark pseudo-labels: {r['visible']} of {r['faces']} faces visible "
          f"({r['too_small']} under {r['min_face_px']:g} px tall, {r['implausible']} implausible)",
          flush=True)
    return labels


def pose_label_rows(boxes: np.ndarray, points: np.ndarray, visible: np.ndarray,
                    width: int, height: int) -> list[str]:
    """ultralytics pose label lines `0 cx cy w h x1 y1 v1 ... x5 y5 v5`, all normalised to [0, 1];
    unusable points are written `0 0 0`."""
    rows = []
    size = np.array([width, height], np.float64)
    for box, pts, vis in zip(np.asarray(boxes, np.float64), np.asarray(points, np.float64), visible):
        x1, y1 = np.clip(box[:2], 0, size)
        x2, y2 = np.clip(box[2:], 0, size)
        values = [(x1 + x2) / 2 / width, (y1 + y2) / 2 / height, (x2 - x1) / width, (y2 - y1) / height]
        for x, y in pts / size:
            ok = bool(vis) and 0.0 <= x <= 1.0 and 0.0 <= y <= 1.0
            values += [x, y, 2.0] if ok else [0.0, 0.0, 0.0]
        rows.append("0 " + " ".join(f"{v:.6f}" for v in values))
    return rows


def write_pose_dataset(root: Path, out_dir: Path, split_file: Path | None = None,
                       min_face_px: float = MIN_FACE_PX) -> tuple[Path, dict, LandmarkLabels]:
    """An ultralytics pose dataset of the split: `out_dir/images/<rel>` links to the shared
    images (never copies), `out_dir/labels/<rel>.txt` the pose labels, and the data YAML with
    `kpt_shape: [5, 3]` and the flip index. Returns the YAML, the skip report and the labels."""
    from facewatch.training.dlib_teacher import FLIP_INDEX, LANDMARK_NAMES
    from facewatch.training.widerface import SPLIT_FILE, check_images, load_split

    split_file = split_file or SPLIT_FILE
    split = load_split(split_file)
    out_dir.mkdir(parents=True, exist_ok=True)
    report, good = {}, {}
    for side in ("train", "val"):
        checked = check_images(root, split[side])
        if not checked.good:
            raise ValueError(f"no usable {side} images under {root / 'images'} (from {split_file})")
        good[side] = [p.relative_to(Path(root) / "images").as_posix() for p in checked.good]
        report[side] = {"images": len(checked.good), "skipped": len(checked.skipped),
                        "skipped_reasons": checked.skipped}
    labels = load_landmark_labels(root, good["train"] + good["val"], min_face_px)
    for side in ("train", "val"):
        listed, faces, visible = [], 0, 0
        for rel in good[side]:
            if rel not in labels:
                report[side]["skipped_reasons"][rel] = "no landmark labels"
                continue
            boxes, points, vis = labels.image(rel)
            h, w = labels.sizes[labels._index()[rel]]
            image = out_dir / "images" / rel
            image.parent.mkdir(parents=True, exist_ok=True)
            if not image.is_symlink():
                image.symlink_to((Path(root) / "images" / rel).resolve())
            label = (out_dir / "labels" / rel).with_suffix(".txt")
            label.parent.mkdir(parents=True, exist_ok=True)
            label.write_text("".join(f"{row}\n" for row in pose_label_rows(boxes, points, vis, w, h)))
            listed.append(image)
            faces += len(boxes)
            visible += int(vis.sum())
        (out_dir / f"{side}.txt").write_text("".join(f"{p}\n" for p in listed))
        report[side].update(images=len(listed), faces=faces, faces_with_landmarks=visible)
    data_yaml = out_dir / "widerface-pose.yaml"
    data_yaml.write_text(
        f"path: {out_dir}\ntrain: {out_dir / 'train.txt'}\nval: {out_dir / 'val.txt'}\n"
        f"kpt_shape: [{NUM_LANDMARKS}, 3]\nflip_idx: {list(FLIP_INDEX)}\n"
        f"kpt_names:\n  0: {list(LANDMARK_NAMES)}\nnames:\n  0: face\n")
    report["landmarks"] = labels.reasons
    return data_yaml, report, labels


if __name__ == "__main__":  # build (or read) the cache of the committed split and print the counts
    from facewatch.training.paths import shared_data_dir
    from facewatch.training.widerface import load_split

    _root = shared_data_dir() / "widerface"
    _split = load_split()
    load_landmark_labels(_root, _split["train"] + _split["val"])
