"""Faces with five-point labels for the landmark model, and the augmented crops it trains on.

Labels are dlib's 5-point model (the teacher extra) or, with `labels="yunet"`, YuNet's five
points (eye centres, nose tip, mouth corners: the ArcFace layout SFace is aligned on), never
human ones:
- LFW: dlib: every face of the teacher cache (`training.teacher_cache`): our detector's box,
  dlib's points inside it. YuNet: our detector's box (`embedder_data.FaceBoxer`, as the cache
  computes it), YuNet's face overlapping it (`SFaceTeacher.face_in_box`), cached in
  `runs/landmarks/lfw-yunet5-<key>.npz`. Split by person with the embedder's split (validation
  people stay out).
- WIDER FACE: faces of the pseudo-label cache (`training.widerface_landmarks`, same labeller)
  with visible points and a box at least `MIN_WIDER_PX` tall; the detector's event split.

Each face is kept as a context patch (`CONTEXT_SCALE` times the box's longer side, resampled to
`CONTEXT_SIZE` px) so augmenting never needs the full image. A training crop is then the runtime
crop (`stages.face_crop.box_crop_matrix`) of a jittered, rotated box inside that patch: the model
learns to place points from the imperfect boxes a detector gives, on rolled heads.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import keras
import numpy as np

from facewatch.stages.face_crop import ARCFACE_FLIP_INDEX, box_crop_matrix, landmarks_plausible

CONTEXT_SIZE = 128
CONTEXT_SCALE = 2.2
MIN_WIDER_PX = 24.0
# Mirroring a face swaps its eyes: outer/inner right <-> outer/inner left; the nose stays.
FLIP_INDEX = (2, 3, 0, 1, 4)
# The label source -> the layout of its points (`stages.face_crop.LANDMARK_LAYOUTS`), and each
# layout's mirror order.
LABELS = {"dlib": "dlib", "yunet": "arcface"}
FLIP_INDEX_OF = {"dlib": FLIP_INDEX, "arcface": ARCFACE_FLIP_INDEX}


@dataclass
class LandmarkFaces:
    """Context patches with boxes and points in patch pixels; `source` says where each face is from."""
    patches: np.ndarray   # (N, CONTEXT_SIZE, CONTEXT_SIZE, 3) uint8 BGR
    boxes: np.ndarray     # (N, 4) float32
    points: np.ndarray    # (N, 5, 2) float32
    source: np.ndarray    # (N,) str: "lfw" or "wider"
    layout: str = "dlib"  # the points' layout: "dlib" or "arcface" (LABELS)

    def __len__(self) -> int:
        return len(self.boxes)

    def subset(self, rows) -> "LandmarkFaces":
        return LandmarkFaces(self.patches[rows], self.boxes[rows], self.points[rows],
                             self.source[rows], self.layout)

    @staticmethod
    def concat(parts: list["LandmarkFaces"]) -> "LandmarkFaces":
        layouts = {p.layout for p in parts if len(p)} or {parts[0].layout}
        if len(layouts) != 1:
            raise ValueError(f"cannot mix landmark layouts {sorted(layouts)}")
        return LandmarkFaces(*(np.concatenate([getattr(p, f) for p in parts])
                               for f in ("patches", "boxes", "points", "source")), layouts.pop())


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    points = np.asarray(points, np.float32).reshape(-1, 2)
    return (points @ matrix[:, :2].T + matrix[:, 2]).astype(np.float32)


def context_patches(frame: np.ndarray, boxes, points, source: str, layout: str = "dlib"
                    ) -> LandmarkFaces:
    """Cut the context patch of each (box, points) face out of one BGR frame."""
    patches, out_boxes, out_points = [], [], []
    for box, pts in zip(np.asarray(boxes, np.float32), np.asarray(points, np.float32)):
        m = box_crop_matrix(box, CONTEXT_SIZE, CONTEXT_SCALE)
        patches.append(cv2.warpAffine(frame, m, (CONTEXT_SIZE, CONTEXT_SIZE),
                                      flags=cv2.INTER_AREA if m[0, 0] < 1 else cv2.INTER_LINEAR,
                                      borderMode=cv2.BORDER_REPLICATE))
        out_boxes.append(_apply(m, box.reshape(2, 2)).reshape(4))
        out_points.append(_apply(m, pts))
    n = len(patches)
    return LandmarkFaces(np.array(patches, np.uint8).reshape(n, CONTEXT_SIZE, CONTEXT_SIZE, 3),
                         np.array(out_boxes, np.float32).reshape(n, 4),
                         np.array(out_points, np.float32).reshape(n, 5, 2), np.array([source] * n),
                         layout)


def lfw_yunet_labels(images_dir: Path, people: dict[str, list[int]], detector: Path | None
                     ) -> dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]:
    """(name, index) -> (our detector's box, YuNet's five points in it, NaN where YuNet finds no
    face overlapping the box), computed once into `runs/landmarks/lfw-yunet5-<key>.npz`."""
    import hashlib
    import json
    import time

    from facewatch.stages.gallery import file_sha256
    from facewatch.training.embedder_data import DETECTOR_IMGSZ, FaceBoxer, read_image
    from facewatch.training.lfw import image_path
    from facewatch.training.paths import runs_dir
    from facewatch.training.sface_teacher import SFaceTeacher

    keys = sorted((n, i) for n, idx in people.items() for i in idx)
    has_detector = detector is not None and Path(detector).is_file()
    key = hashlib.sha1(json.dumps({
        "detector": file_sha256(Path(detector)) if has_detector else "centre-box",
        "imgsz": DETECTOR_IMGSZ, "images": str(Path(images_dir).resolve()),
        "keys": keys, "version": 1}).encode()).hexdigest()[:16]
    path = runs_dir() / "landmarks" / f"lfw-yunet5-{key}.npz"
    if not path.is_file():
        print(f"landmark labels: YuNet in our detector's boxes of {len(keys)} LFW images (once; "
              f"cached in {path})", flush=True)
        boxer = FaceBoxer(Path(detector) if has_detector else None, DETECTOR_IMGSZ)
        yunet = SFaceTeacher(embeddings=False)
        boxes = np.zeros((len(keys), 4), np.float32)
        points = np.full((len(keys), 5, 2), np.nan, np.float32)
        start = time.monotonic()
        for n, (name, index) in enumerate(keys):
            frame = read_image(image_path(images_dir, name, index))
            boxes[n] = boxer.boxes([frame])[0]
            face = yunet.face_in_box(frame, boxes[n])
            if face is not None:
                points[n] = face[1]
            if (n + 1) % 500 == 0:
                print(f"  {n + 1}/{len(keys)} images, {time.monotonic() - start:.0f} s", flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, boxes=boxes, points=points)
        tmp.replace(path)
    with np.load(path) as z:
        return {k: (z["boxes"][i], z["points"][i]) for i, k in enumerate(keys)}


def lfw_faces(images_dir: Path, detector: Path, max_people: int | None = None,
              labels: str = "dlib") -> tuple[LandmarkFaces, LandmarkFaces]:
    """(train, val) LFW faces from the teacher cache (dlib) or YuNet's labels, split by person
    (`max_people` of each side, spread over the alphabet, for tests)."""
    from facewatch.training.embedder_data import read_image
    from facewatch.training.lfw import image_path, load_split
    from facewatch.training.teacher_cache import load_teacher_cache, training_people

    if labels not in LABELS:
        raise ValueError(f"landmark labels must be one of {tuple(LABELS)}, got {labels!r}")

    people = training_people(images_dir)
    val_people = set(load_split(images_dir)["val_people"])
    if max_people:
        names = sorted(people)
        train = [n for n in names if n not in val_people]
        val = [n for n in names if n in val_people]
        keep = (train[::max(1, len(train) // max_people)][:max_people]
                + val[::max(1, len(val) // max_people)][:max_people])
        people = {n: people[n] for n in keep}
    layout = LABELS[labels]
    if labels == "dlib":
        cache = load_teacher_cache(images_dir, people, detector)
        faces = {k: (cache.boxes[row], cache.landmarks[row])
                 for k, row in sorted(cache.index.items(), key=lambda kv: kv[1])}
    else:
        faces = lfw_yunet_labels(images_dir, people, detector)
    parts: dict[bool, list[LandmarkFaces]] = {True: [], False: []}
    for (name, index), (box, pts) in faces.items():
        if not landmarks_plausible(pts, box, layout):
            continue
        frame = read_image(image_path(images_dir, name, index))
        parts[name in val_people].append(context_patches(frame, box[None], pts[None], "lfw", layout))
    empty = context_patches(np.zeros((8, 8, 3), np.uint8), [], np.zeros((0, 5, 2)), "lfw", layout)
    return (LandmarkFaces.concat(parts[False] or [empty]),
            LandmarkFaces.concat(parts[True] or [empty]))


def wider_faces(root: Path, min_px: float = MIN_WIDER_PX, max_images: int | None = None,
                labels: str = "dlib") -> tuple[LandmarkFaces, LandmarkFaces]:
    """(train, val) WIDER faces with visible pseudo-labels (dlib's or YuNet's), by the detector's
    event split (`max_images` of each side, for tests)."""
    from facewatch.training.widerface import load_split
    from facewatch.training.widerface_landmarks import load_landmark_labels

    split = load_split()
    if max_images:
        split = {k: split[k][::max(1, len(split[k]) // max_images)][:max_images]
                 for k in ("train", "val")}
    layout = LABELS[labels]
    cached = load_landmark_labels(root, split["train"] + split["val"], labeller=labels)
    out = {}
    for part in ("train", "val"):
        faces = []
        for rel in split[part]:
            if rel not in cached:
                continue
            boxes, points, visible = cached.image(rel)
            keep = visible & ((boxes[:, 3] - boxes[:, 1]) >= min_px)
            if not keep.any():
                continue
            frame = cv2.imread(str(Path(root) / "images" / rel))
            faces.append(context_patches(frame, boxes[keep], points[keep], "wider", layout))
        out[part] = LandmarkFaces.concat(faces) if faces else context_patches(
            np.zeros((8, 8, 3), np.uint8), [], np.zeros((0, 5, 2)), "wider", layout)
    return out["train"], out["val"]


def runtime_crops(faces: LandmarkFaces, size: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Un-augmented crops exactly as the daemon makes them from the box, and their targets."""
    crops = np.empty((len(faces), size, size, 3), np.uint8)
    targets = np.empty((len(faces), 10), np.float32)
    for i in range(len(faces)):
        m = box_crop_matrix(faces.boxes[i], size, scale)
        crops[i] = cv2.warpAffine(faces.patches[i], m, (size, size), flags=cv2.INTER_AREA,
                                  borderMode=cv2.BORDER_REPLICATE)
        targets[i] = (_apply(m, faces.points[i]) / size).reshape(10)
    return crops, targets


def augmented_crop(patch: np.ndarray, box: np.ndarray, points: np.ndarray, size: int, scale: float,
                   rng: np.random.Generator, flip_index=FLIP_INDEX) -> tuple[np.ndarray, np.ndarray]:
    """One training crop and its (10,) target: geometry, then light, blur and low resolution."""
    crop, target = augment_geometry(patch, box, points, size, scale, rng, flip_index)
    return augment_pixels(crop, rng), target


def augment_geometry(patch: np.ndarray, box: np.ndarray, points: np.ndarray, size: int, scale: float,
                     rng: np.random.Generator, flip_index=FLIP_INDEX) -> tuple[np.ndarray, np.ndarray]:
    """Box jitter (shift, scale, aspect), roll and mirror; the target moves with the pixels."""
    x1, y1, x2, y2 = (float(v) for v in box)
    w, h = x2 - x1, y2 - y1
    cx, cy = (x1 + x2) / 2 + rng.uniform(-0.08, 0.08) * w, (y1 + y2) / 2 + rng.uniform(-0.08, 0.08) * h
    w, h = w * rng.uniform(0.88, 1.14), h * rng.uniform(0.88, 1.14)
    jittered = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
    angle = float(np.clip(rng.normal(0.0, 12.0), -35.0, 35.0))
    rotate = np.vstack([cv2.getRotationMatrix2D((cx, cy), angle, 1.0), [0, 0, 1]])
    m = (np.vstack([box_crop_matrix(jittered, size, scale), [0, 0, 1]]) @ rotate)[:2].astype(np.float32)
    crop = cv2.warpAffine(patch, m, (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REPLICATE)
    pts = _apply(m, points)
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
        pts = pts[list(flip_index)]
        pts[:, 0] = size - 1 - pts[:, 0]
    return np.ascontiguousarray(crop), (pts / size).reshape(10).astype(np.float32)


def augment_pixels(crop: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Low resolution (surveillance faces are often 20-40 px), blur, light, grey."""
    size = crop.shape[0]
    if rng.random() < 0.3:
        small = int(rng.integers(12, size // 2))
        crop = cv2.resize(cv2.resize(crop, (small, small), interpolation=cv2.INTER_AREA),
                          (size, size), interpolation=cv2.INTER_LINEAR)
    elif rng.random() < 0.2:
        crop = cv2.GaussianBlur(crop, (3, 3), 0)
    crop = crop.astype(np.float32) * rng.uniform(0.6, 1.4) + rng.uniform(-30, 30)
    if rng.random() < 0.15:
        crop = np.repeat(crop.mean(axis=2, keepdims=True), 3, axis=2)
    return np.clip(crop, 0, 255).astype(np.uint8)


class AugmentedBatches(keras.utils.PyDataset):
    """Shuffled batches of augmented crops (RGB float32 0..255, as the exported model takes)."""

    def __init__(self, faces: LandmarkFaces, size: int, scale: float, batch_size: int = 64,
                 seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.faces, self.size, self.scale, self.batch_size = faces, size, scale, batch_size
        self.rng = np.random.default_rng(seed)
        self.order = self.rng.permutation(len(faces))

    def __len__(self) -> int:
        return len(self.faces) // self.batch_size

    def __getitem__(self, i):
        rows = self.order[i * self.batch_size:(i + 1) * self.batch_size]
        x = np.empty((len(rows), self.size, self.size, 3), np.float32)
        y = np.empty((len(rows), 10), np.float32)
        for j, r in enumerate(rows):
            crop, y[j] = augmented_crop(self.faces.patches[r], self.faces.boxes[r],
                                        self.faces.points[r], self.size, self.scale, self.rng,
                                        FLIP_INDEX_OF[self.faces.layout])
            x[j] = crop[..., ::-1]
        return x, y

    def on_epoch_end(self) -> None:
        self.order = self.rng.permutation(len(self.faces))
