"""Face crops for the embedder: found and cropped as the daemon does, cached once, augmented per batch.

Each LFW image gets one face box: the detector's (largest detection containing the image centre,
since LFW images are centred on their person) or, without a detector or a detection, a fixed
centre box. Landmarks come from the detector when it predicts them, or from dlib's 5-point model
(the teacher cache; `--landmarks dlib`), which labelled the detector's keypoints. The crop is
always `stages.face_crop.crop_faces`. All crops are computed once into
`runs/embedder_cache/<key>/crops.npy`, keyed by the detector file's hash, the landmark source and
the crop settings.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import keras
import numpy as np

from facewatch.stages.face_crop import CropSpec, crop_faces
from facewatch.stages.gallery import file_sha256
from facewatch.training.lfw import image_path
from facewatch.training.paths import REPO_ROOT, runs_dir

log = logging.getLogger("facewatch.embedder_data")

DEFAULT_DETECTOR = REPO_ROOT / "models" / "face_detector.onnx"
# Face box on a 250x250 deep-funneled LFW image (hairline to chin, cheek to cheek), measured by
# eye on a sample of images; scaled for other image sizes.
LFW_CENTRE_BOX = (80.0, 72.0, 170.0, 182.0)
LFW_SIDE = 250.0
# LFW's 250 px images are mostly face. Our detector, trained on WIDER scenes where faces are
# small, finds 99 of 100 sampled LFW faces at 160 px input and 33 of 100 at 320 (measured on
# the epoch-13 checkpoint): detect at the scale the faces were trained at.
DETECTOR_IMGSZ = 160


def centre_box(shape) -> np.ndarray:
    h, w = shape[:2]
    return np.array(LFW_CENTRE_BOX, np.float32) * np.array([w, h, w, h], np.float32) / LFW_SIDE


def choose_face_box(boxes: np.ndarray, shape) -> np.ndarray | None:
    """The largest detection that contains the image centre; None when there is none."""
    h, w = shape[:2]
    cx, cy = w / 2.0, h / 2.0
    if len(boxes) == 0:
        return None
    inside = (boxes[:, 0] <= cx) & (boxes[:, 2] >= cx) & (boxes[:, 1] <= cy) & (boxes[:, 3] >= cy)
    if not inside.any():
        return None
    candidates = boxes[inside]
    areas = (candidates[:, 2] - candidates[:, 0]) * (candidates[:, 3] - candidates[:, 1])
    return candidates[int(np.argmax(areas))].astype(np.float32)


class FaceBoxer:
    """Boxes for images, exactly as evaluation and the cache compute them."""

    def __init__(self, detector_path: Path | None, imgsz: int | None = DETECTOR_IMGSZ,
                 conf_threshold: float = 0.35, landmarks: Path | None = None):
        self.detector = None
        self.detector_path = detector_path
        if detector_path is not None and Path(detector_path).is_file():
            from facewatch.stages.face_detector import FaceDetector

            self.detector = FaceDetector(detector_path, providers=("CPUExecutionProvider",),
                                         conf_threshold=conf_threshold, imgsz=imgsz,
                                         landmarks=landmarks)
        self.fallbacks = 0

    @property
    def description(self) -> str:
        if self.detector is None:
            return "fixed LFW centre box (no detector)"
        marker = self.detector.landmark_model
        return (f"{Path(self.detector_path).name} at imgsz {self.detector.imgsz}, centre-box fallback"
                + (f", landmarks from {Path(marker.path).name}" if marker is not None else ""))

    def boxes(self, frames: list[np.ndarray]) -> list[np.ndarray]:
        return [box for box, _ in self.faces(frames)]

    def faces(self, frames: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """(box, landmarks (5, 2) or None) of each image's face."""
        if self.detector is None:
            self.fallbacks += len(frames)
            return [(centre_box(f.shape), None) for f in frames]
        out = []
        for frame, det in zip(frames, self.detector.detect(frames)):
            box = choose_face_box(det.boxes, frame.shape)
            if box is None:
                self.fallbacks += 1
                out.append((centre_box(frame.shape), None))
                continue
            row = int(np.flatnonzero((det.boxes == box).all(axis=1))[0])
            out.append((box, None if det.landmarks is None else det.landmarks[row]))
        return out


def read_image(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise FileNotFoundError(f"cannot read image {path}")
    return image


def at_face_height(frame: np.ndarray, box: np.ndarray, face_px: float) -> np.ndarray:
    """The frame as a camera would give it with this face `face_px` tall: downscaled (area
    average) and scaled back up to its own size, so boxes and landmarks still apply. A face
    already smaller is left as it is."""
    factor = face_px / max(float(box[3] - box[1]), 1.0)
    if factor >= 1.0:
        return frame
    h, w = frame.shape[:2]
    small = cv2.resize(frame, (max(1, round(w * factor)), max(1, round(h * factor))),
                       interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def crop_images(paths: list[Path], boxer: FaceBoxer, spec: CropSpec,
                faces: list[tuple[np.ndarray, np.ndarray | None]] | None = None,
                batch: int = 16, face_px: float | None = None) -> tuple[np.ndarray, int]:
    """(N, size, size, 3) uint8 BGR crops, one face per image, and how many were aligned on
    their own landmarks. `faces` gives (box, landmarks) per image instead of the boxer's.
    `face_px`: crop each face as if it were that many pixels tall (`at_face_height`); boxes
    and landmarks come from the full-resolution image."""
    out = np.empty((len(paths), spec.size, spec.size, 3), np.uint8)
    aligned = 0
    for start in range(0, len(paths), batch):
        frames = [read_image(p) for p in paths[start:start + batch]]
        found = faces[start:start + batch] if faces is not None else boxer.faces(frames)
        for i, (frame, (box, points)) in enumerate(zip(frames, found)):
            if face_px is not None:
                frame = at_face_height(frame, box, face_px)
            crop, ok = crop_faces(frame, box[None], spec, None if points is None else points[None])
            out[start + i] = crop[0]
            aligned += int(ok[0])
    return out, aligned


@dataclass
class CropCache:
    crops: np.ndarray                    # (N, S, S, 3) uint8 BGR
    index: dict[tuple[str, int], int]    # (name, image number) -> row
    fallbacks: int
    boxes_from: str
    aligned: int = 0    # crops aligned on their own landmarks (the rest used the box fallback)


def load_crop_cache(images_dir: Path, people: dict[str, list[int]], detector: Path | None,
                    spec: CropSpec = CropSpec(), detector_imgsz: int | None = DETECTOR_IMGSZ,
                    teacher=None, cache_root: Path | None = None,
                    landmarks_from: str | None = None) -> CropCache:
    """Crops of every listed image, computed once and reused while the inputs stay the same.

    `teacher` (a `training.teacher_cache.TeacherCache` built with the same detector) supplies
    dlib's boxes and landmarks (or, named by `landmarks_from`, another labeller's: YuNet's for
    `arcface_five_point`); without it the detector's own landmarks are used, if any.
    """
    has_detector = detector is not None and Path(detector).is_file()
    keys = sorted((name, i) for name, idx in people.items() for i in idx)
    landmarks_from = landmarks_from or ("dlib 5-point" if teacher is not None else "detector")
    key = hashlib.sha1(json.dumps({
        "detector": file_sha256(Path(detector)) if has_detector else "centre-box",
        "imgsz": detector_imgsz if has_detector else None, "scale": spec.scale, "size": spec.size,
        "alignment": spec.alignment, "landmarks": landmarks_from,
        "images": str(Path(images_dir).resolve()), "keys": keys}).encode()).hexdigest()[:16]
    folder = (cache_root or runs_dir() / "embedder_cache") / key
    index = {k: i for i, k in enumerate(keys)}
    if (folder / "crops.npy").is_file() and (folder / "meta.json").is_file():
        meta = json.loads((folder / "meta.json").read_text())
        crops = np.load(folder / "crops.npy", mmap_mode=None)
        log.info("crop cache %s: %d crops (%d centre-box fallbacks)", folder, len(crops),
                 meta["fallbacks"])
        return CropCache(crops, index, meta["fallbacks"], meta["boxes_from"], meta.get("aligned", 0))
    boxer = FaceBoxer(Path(detector) if has_detector else None, detector_imgsz)
    faces = None
    if teacher is not None:   # its boxes are the boxer's, computed when the teacher cache was
        boxer.fallbacks = teacher.centre_box_fallbacks
        rows = [teacher.index[k] for k in keys]
        faces = [(teacher.boxes[r], teacher.landmarks[r]) for r in rows]
    log.info("cropping %d images with %s (once; cached in %s)", len(keys), boxer.description, folder)
    start = time.monotonic()
    crops, aligned = crop_images([image_path(images_dir, n, i) for n, i in keys], boxer, spec, faces)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "crops.tmp.npy"
    np.save(tmp, crops)
    tmp.rename(folder / "crops.npy")
    description = boxer.description + (f", {spec.alignment} alignment on {landmarks_from} landmarks"
                                       if spec.alignment != "box" else ", box crops")
    meta = {"fallbacks": boxer.fallbacks, "boxes_from": description, "count": len(keys),
            "aligned": aligned, "crop_scale": spec.scale, "size": spec.size,
            "alignment": spec.alignment, "seconds": round(time.monotonic() - start, 1)}
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))
    print(f"face crops: {len(keys)} images, boxes from {description}; {boxer.fallbacks} used the "
          f"centre-box fallback, {aligned} aligned on their landmarks", flush=True)
    return CropCache(crops, index, boxer.fallbacks, description, aligned)


def load_unlabelled_crops(faces, spec: CropSpec = CropSpec(), cache_root: Path | None = None
                          ) -> tuple[np.ndarray, int]:
    """Crops of every face of a `training.unlabelled_teacher.UnlabelledFaces` cache, on dlib's
    landmarks (five_point) or their boxes, computed once into `runs/embedder_cache/` like the
    LFW crops. Returns (N, S, S, 3) uint8 BGR crops in the cache's row order and how many were
    aligned on their own landmarks."""
    key = hashlib.sha1(json.dumps({
        "faces": faces.key, "scale": spec.scale, "size": spec.size, "alignment": spec.alignment,
        "landmarks": "dlib 5-point"}).encode()).hexdigest()[:16]
    folder = (cache_root or runs_dir() / "embedder_cache") / f"unlabelled-{key}"
    if (folder / "crops.npy").is_file() and (folder / "meta.json").is_file():
        return np.load(folder / "crops.npy"), json.loads((folder / "meta.json").read_text())["aligned"]
    start = time.monotonic()
    crops = np.empty((len(faces), spec.size, spec.size, 3), np.uint8)
    aligned = 0
    for source, frame in faces.frames():
        rows = np.flatnonzero(faces.source == source)
        out, ok = crop_faces(frame, faces.boxes[rows], spec, faces.landmarks[rows])
        crops[rows] = out
        aligned += int(ok.sum())
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "crops.tmp.npy", crops)
    (folder / "crops.tmp.npy").replace(folder / "crops.npy")
    (folder / "meta.json").write_text(json.dumps({
        "faces": faces.key, "count": len(faces), "aligned": aligned, "alignment": spec.alignment,
        "crop_scale": spec.scale, "size": spec.size, "seconds": round(time.monotonic() - start, 1)},
        indent=1))
    print(f"unlabelled face crops: {len(faces)} faces, {spec.alignment} "
          f"({aligned} aligned on dlib's landmarks)", flush=True)
    return crops, aligned


def load_folder_crops(faces, rows: np.ndarray, spec: CropSpec, cache_root: Path | None = None
                      ) -> np.ndarray:
    """Crops of the given rows of a `training.folder_teacher.FolderFaces` cache (photos of any
    folder): `arcface_five_point` on YuNet's points, `five_point` on dlib's, `box` on YuNet's box.
    Computed once into `runs/embedder_cache/folder-<key>/crops.npy` (read back memory-mapped)."""
    rows = np.asarray(rows, np.int64)
    digest = hashlib.sha1(json.dumps({
        "faces": Path(faces.cache).name, "size": spec.size, "scale": spec.scale,
        "alignment": spec.alignment}).encode())
    digest.update("\n".join(faces.paths[rows]).encode())
    folder = (cache_root or runs_dir() / "embedder_cache") / f"folder-{digest.hexdigest()[:16]}"
    if (folder / "crops.npy").is_file():
        return np.load(folder / "crops.npy", mmap_mode="r")
    points = {"arcface_five_point": faces.yunet_points, "five_point": faces.dlib_points,
              "box": None}[spec.alignment]
    start = time.monotonic()
    crops = np.empty((len(rows), spec.size, spec.size, 3), np.uint8)
    for j, r in enumerate(rows):
        image = read_image(Path(faces.folder) / str(faces.paths[r]))
        crops[j] = crop_faces(image, faces.boxes[r][None], spec,
                              None if points is None else points[r][None])[0][0]
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "crops.tmp.npy", crops)
    (folder / "crops.tmp.npy").replace(folder / "crops.npy")
    (folder / "meta.json").write_text(json.dumps({
        "faces": str(faces.cache), "photos": str(faces.folder), "count": len(rows),
        "alignment": spec.alignment, "size": spec.size,
        "seconds": round(time.monotonic() - start, 1)}, indent=1))
    print(f"folder face crops: {len(rows)} faces of {faces.folder}, {spec.alignment}", flush=True)
    return crops


# ---------------------------------------------------------------------------- augmentation
def augment_crop(crop: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One BGR uint8 crop -> a randomly altered float32 copy (detector jitter, camera, light)."""
    size = crop.shape[0]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    # Scale, shift and a small roll: what detector boxes and unaligned faces look like.
    scale = rng.uniform(0.9, 1.1)
    angle = rng.uniform(-10.0, 10.0) if rng.random() < 0.5 else 0.0
    matrix = cv2.getRotationMatrix2D((size / 2.0, size / 2.0), angle, scale)
    matrix[:, 2] += rng.uniform(-0.06, 0.06, 2) * size
    img = cv2.warpAffine(np.ascontiguousarray(crop), matrix, (size, size), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_REPLICATE)
    r = rng.random()
    if r < 0.15:  # low-resolution camera: down and up again
        small = int(rng.uniform(0.3, 0.7) * size)
        img = cv2.resize(cv2.resize(img, (small, small), interpolation=cv2.INTER_AREA), (size, size),
                         interpolation=cv2.INTER_LINEAR)
    elif r < 0.3:
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.5, 1.5))
    img = img.astype(np.float32)
    if rng.random() < 0.8:  # brightness, contrast, saturation, per-channel tint
        grey = img.mean(axis=2, keepdims=True)
        img = grey + (img - grey) * rng.uniform(0.6, 1.4)
        img = (img - img.mean()) * rng.uniform(0.7, 1.3) + img.mean()
        img = img * rng.uniform(0.7, 1.3) * rng.uniform(0.93, 1.07, 3)
    if rng.random() < 0.1:
        img = np.repeat(img.mean(axis=2, keepdims=True), 3, axis=2)
    return np.clip(img, 0.0, 255.0)


def to_model_input(crops_bgr: np.ndarray) -> np.ndarray:
    """uint8/float BGR crops -> float32 RGB 0..255, the model's input (as FaceEmbedder feeds it)."""
    return np.ascontiguousarray(crops_bgr[..., ::-1], dtype=np.float32)


def augment_batch(crops_bgr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return to_model_input(augmented_bgr(crops_bgr, rng))


def augmented_bgr(crops_bgr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.stack([augment_crop(c, rng) for c in crops_bgr])


# ---------------------------------------------------------------------------- batches
def with_teacher(labels: np.ndarray, teacher: np.ndarray | None, rows: np.ndarray):
    """The batch's targets: identity labels, plus the teacher's embeddings when distilling.
    (A mirrored crop keeps its teacher vector: dlib's embedding barely moves under a flip.)"""
    labels = labels.astype(np.int32)
    return labels if teacher is None else (labels, teacher[rows].astype(np.float32))


def batch_inputs_and_targets(crops: np.ndarray, labels: np.ndarray, rows: np.ndarray,
                             rng: np.random.Generator, augment: bool, teacher: np.ndarray | None,
                             consistent=None):
    """Model input and targets of one batch. With a `training.consistent_teacher.ConsistentTeacher`
    part of the cached teacher vectors are replaced by the teacher's vectors of the augmented crops."""
    bgr = augmented_bgr(crops, rng) if augment else crops.astype(np.float32)
    targets = with_teacher(labels[rows], teacher, rows)
    if consistent is not None and teacher is not None and augment:
        targets = (targets[0], consistent.refresh(targets[1], bgr, rng))
    return to_model_input(bgr), targets

class ShuffledBatches(keras.utils.PyDataset):
    """All training images in a fresh random order each epoch (ArcFace).

    Rows labelled -1 are faces without identity (distillation only). With `max_unlabelled_share`
    an epoch holds every labelled row and a fresh random subset of the unlabelled ones, at most
    that fraction of the epoch, so they cannot crowd out the identity loss (with a few people).
    """

    def __init__(self, crops: np.ndarray, labels: np.ndarray, batch_size: int, seed: int = 0,
                 augment: bool = True, teacher: np.ndarray | None = None,
                 max_unlabelled_share: float | None = None, consistent=None, **kwargs):
        super().__init__(**kwargs)
        if max_unlabelled_share is not None and not 0.0 <= max_unlabelled_share < 1.0:
            raise ValueError(f"max_unlabelled_share must be in [0, 1), got {max_unlabelled_share}")
        self.crops, self.labels, self.batch_size, self.augment = crops, labels, batch_size, augment
        self.teacher, self.consistent = teacher, consistent
        self.rng = np.random.default_rng(seed)
        self.labelled = np.flatnonzero(labels >= 0)
        self.unlabelled = np.flatnonzero(labels < 0)
        self.unlabelled_per_epoch = len(self.unlabelled)
        if max_unlabelled_share is not None:
            cap = int(max_unlabelled_share / (1.0 - max_unlabelled_share) * len(self.labelled))
            self.unlabelled_per_epoch = min(cap, len(self.unlabelled))
        self.order = self._epoch_order()

    def _epoch_order(self) -> np.ndarray:
        unlabelled = self.unlabelled
        if self.unlabelled_per_epoch < len(unlabelled):
            unlabelled = self.rng.choice(unlabelled, self.unlabelled_per_epoch, replace=False)
        return self.rng.permutation(np.concatenate([self.labelled, unlabelled]))

    def __len__(self) -> int:
        # full batches only: BatchNorm and mining
        return (len(self.labelled) + self.unlabelled_per_epoch) // self.batch_size

    def __getitem__(self, index: int):
        rows = np.sort(self.order[index * self.batch_size:(index + 1) * self.batch_size])
        rng = np.random.default_rng((int(self.rng.integers(1 << 31)), index))
        return batch_inputs_and_targets(self.crops[rows], self.labels, rows, rng, self.augment,
                                        self.teacher, self.consistent)

    def on_epoch_end(self) -> None:
        self.order = self._epoch_order()


class IdentityBatches(keras.utils.PyDataset):
    """P identities x K images per batch, so every batch has positives (triplet, contrastive).

    Only identities with >= 2 images take part; one epoch shows about every such image once.
    """

    def __init__(self, crops: np.ndarray, labels: np.ndarray, batch_size: int,
                 per_identity: int = 4, seed: int = 0, augment: bool = True,
                 teacher: np.ndarray | None = None, consistent=None, **kwargs):
        super().__init__(**kwargs)
        self.teacher, self.consistent = teacher, consistent
        if batch_size % per_identity:
            raise ValueError(f"batch size {batch_size} must be a multiple of images per identity "
                             f"{per_identity}")
        self.crops, self.augment, self.k = crops, augment, per_identity
        self.p = batch_size // per_identity
        rows_by_label: dict[int, list[int]] = {}
        for row, label in enumerate(labels):
            rows_by_label.setdefault(int(label), []).append(row)
        self.groups = [np.array(r) for r in rows_by_label.values() if len(r) >= 2]
        self.labels = labels
        if len(self.groups) < self.p:
            raise ValueError(f"need >= {self.p} identities with 2+ images for batch {batch_size}, "
                             f"have {len(self.groups)}")
        self.rng = np.random.default_rng(seed)
        self.images = sum(len(g) for g in self.groups)

    def __len__(self) -> int:
        return max(1, self.images // (self.p * self.k))

    def __getitem__(self, index: int):
        rng = np.random.default_rng((int(self.rng.integers(1 << 31)), index))
        # Identities drawn in proportion to sqrt(images): big ones come more often, not 500x more.
        weights = np.sqrt([len(g) for g in self.groups])
        chosen = rng.choice(len(self.groups), self.p, replace=False, p=weights / weights.sum())
        rows = np.concatenate([rng.choice(self.groups[g], self.k, replace=len(self.groups[g]) < self.k)
                               for g in chosen])
        return batch_inputs_and_targets(self.crops[rows], self.labels, rows, rng, self.augment,
                                        self.teacher, self.consistent)

