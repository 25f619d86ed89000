"""Landmarks and dlib teacher embeddings for every LFW face we train or validate on, computed once.

    facewatch teacher-cache [--images DIR] [--detector models/face_detector.onnx] [--workers 2]
    facewatch teacher-cache --unlabelled      # WIDER FACE and clip faces: training.unlabelled_teacher
    facewatch teacher-cache --teacher sface|both [--val-pairs N]   # LFW through YuNet + SFace (+ dlib)
    facewatch teacher-cache --folder DIR [--folder DIR ...] --teacher sface|dlib|both
                                              # any folder of face photos: training.folder_teacher

With `--teacher sface` or `both`, LFW goes through `training.folder_teacher` (YuNet's face nearest
the centre, chunked and resumable) instead of the dlib-only cache below, and the teachers' scores
on our validation pairs are printed (`--val-pairs N`: the images of N evenly spread pairs only).

The face box of each image is the one the crop cache uses (`embedder_data.FaceBoxer`: our
detector, centre-box fallback), so landmarks, aligned crops and teacher vectors all describe the
same face. dlib's ResNet costs about 0.1 s a face on one core here, hence the cache and the
process pool. Written to `runs/teacher_cache/lfw-<key>/` (`keys.json`, `boxes.npy`,
`landmarks.npy` (N, 5, 2), `embeddings.npy` (N, 128) unit vectors), keyed by detector and images.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facewatch.training import folder_teacher, unlabelled_teacher
from facewatch.training.paths import runs_dir

log = logging.getLogger("facewatch.teacher_cache")


@dataclass
class TeacherCache:
    index: dict[tuple[str, int], int]   # (name, image number) -> row
    boxes: np.ndarray                   # (N, 4) float32
    landmarks: np.ndarray               # (N, 5, 2) float32, dlib's order
    embeddings: np.ndarray              # (N, 128) float32 unit vectors
    centre_box_fallbacks: int = 0       # images where the detector found no face


def centred(vectors: np.ndarray, mean: np.ndarray | None = None) -> np.ndarray:
    """Unit vectors after removing the mean. dlib's descriptors all sit in a narrow cone (two
    random people's cosine is about 0.83 on LFW), which a student trained with an identity loss
    that spreads classes apart cannot match; centred, two random people are about 0.0 apart and
    same-person pairs still score higher (the verification accuracy is unchanged)."""
    mean = vectors.mean(axis=0) if mean is None else mean
    c = vectors - mean
    return (c / (np.linalg.norm(c, axis=1, keepdims=True) + 1e-12)).astype(np.float32)


def _cache_folder(images_dir: Path, keys: list, detector: Path | None) -> Path:
    from facewatch.stages.gallery import file_sha256
    from facewatch.training.embedder_data import DETECTOR_IMGSZ

    has_detector = detector is not None and Path(detector).is_file()
    key = hashlib.sha1(json.dumps({
        "detector": file_sha256(Path(detector)) if has_detector else "centre-box",
        "imgsz": DETECTOR_IMGSZ, "images": str(Path(images_dir).resolve()),
        "keys": keys}).encode()).hexdigest()[:16]
    return runs_dir() / "teacher_cache" / f"lfw-{key}"


def _describe_chunk(job) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    images_dir, keys, detector = job
    from facewatch.training.dlib_teacher import DlibTeacher
    from facewatch.training.embedder_data import FaceBoxer, read_image
    from facewatch.training.lfw import image_path

    boxer = FaceBoxer(Path(detector) if detector else None)
    teacher = DlibTeacher()
    frames = [read_image(image_path(Path(images_dir), n, i)) for n, i in keys]
    boxes = np.array(boxer.boxes(frames), np.float32)
    points, vectors = [], []
    for frame, box in zip(frames, boxes):
        p, v = teacher.describe(frame[..., ::-1], box[None])
        points.append(p[0])
        vectors.append(v[0])
    return boxes, np.array(points, np.float32), np.array(vectors, np.float32), boxer.fallbacks


def load_teacher_cache(images_dir: Path, people: dict[str, list[int]], detector: Path | None,
                       workers: int = 2, chunk: int = 64) -> TeacherCache:
    keys = sorted((name, i) for name, idx in people.items() for i in idx)
    folder = _cache_folder(images_dir, keys, detector)
    index = {k: i for i, k in enumerate(keys)}
    if (folder / "embeddings.npy").is_file():
        fallbacks = json.loads((folder / "keys.json").read_text())["centre_box_fallbacks"]
        return TeacherCache(index, np.load(folder / "boxes.npy"), np.load(folder / "landmarks.npy"),
                            np.load(folder / "embeddings.npy"), fallbacks)
    has_detector = detector is not None and Path(detector).is_file()
    jobs = [(str(images_dir), keys[s:s + chunk], str(detector) if has_detector else None)
            for s in range(0, len(keys), chunk)]
    print(f"teacher cache: {len(keys)} faces through dlib in {len(jobs)} chunks, {workers} workers "
          f"(once; cached in {folder})", flush=True)
    start, parts, fallbacks = time.monotonic(), [], 0
    with ProcessPoolExecutor(workers) as pool:
        for n, part in enumerate(pool.map(_describe_chunk, jobs), 1):
            parts.append(part)
            fallbacks += part[3]
            if n % 20 == 0 or n == len(jobs):
                print(f"  {n}/{len(jobs)} chunks, {time.monotonic() - start:.0f} s", flush=True)
    boxes, landmarks, embeddings = (np.concatenate([p[i] for p in parts]) for i in range(3))
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in (("boxes", boxes), ("landmarks", landmarks), ("embeddings", embeddings)):
        np.save(folder / f"{name}.tmp.npy", array)
    (folder / "keys.json").write_text(json.dumps({"keys": keys, "centre_box_fallbacks": fallbacks,
                                                  "seconds": round(time.monotonic() - start, 1)}))
    for name in ("boxes", "landmarks", "embeddings"):  # embeddings last: it marks completion
        (folder / f"{name}.tmp.npy").replace(folder / f"{name}.npy")
    return TeacherCache(index, boxes, landmarks, embeddings, fallbacks)


def training_people(images_dir: Path) -> dict[str, list[int]]:
    """Every image of the training people plus every image in the validation pairs."""
    from facewatch.training.lfw import VAL_PAIRS_FILE, list_people, load_split, read_pairs

    people = list_people(images_dir)
    val_people = set(load_split(images_dir)["val_people"])
    wanted = {n: list(idx) for n, idx in people.items() if n not in val_people}
    pairs, _ = read_pairs(VAL_PAIRS_FILE)
    for p in pairs:
        for name, index in ((p.name1, p.index1), (p.name2, p.index2)):
            wanted.setdefault(name, [])
            if index not in wanted[name]:
                wanted[name] = sorted(wanted[name] + [index])
    return wanted


def _lfw_through_folder_cache(args: argparse.Namespace, images: Path) -> int:
    """LFW's training and validation images through `training.folder_teacher`, then each
    teacher's verification on our validation pairs (raw unit vectors; cosine)."""
    from facewatch.training.lfw import VAL_PAIRS_FILE, image_path, read_pairs
    from facewatch.training.verification_metrics import verification_report

    pairs, folds = read_pairs(VAL_PAIRS_FILE)
    if args.val_pairs:
        from facewatch.training.evaluate_embedder import subset_pairs   # (imports Keras)

        pairs, folds = subset_pairs(pairs, folds, args.val_pairs)
        people = {}
        for p in pairs:
            for name, index in ((p.name1, p.index1), (p.name2, p.index2)):
                people.setdefault(name, set()).add(index)
    else:
        people = training_people(images)
    files = sorted(image_path(images, n, i).relative_to(images).as_posix()
                   for n, idx in people.items() for i in idx)
    start = time.monotonic()
    faces = folder_teacher.load_folder_faces(images, args.teacher, files=files, chunk=args.chunk,
                                             workers=args.workers)
    row = faces.index()
    key = lambda name, index: row[image_path(images, name, index).relative_to(images).as_posix()]  # noqa: E731
    report = {"event": "done", **folder_teacher.summary(faces, time.monotonic() - start),
              "pairs": len(pairs), "pair_images": len({(p.name1, p.index1) for p in pairs}
                                                      | {(p.name2, p.index2) for p in pairs})}
    labels = np.array([p.same for p in pairs])
    for teacher in ("sface", "dlib"):
        if not folder_teacher.uses(args.teacher, teacher):
            continue
        v = faces.vectors(teacher)
        scores = np.array([float(v[key(p.name1, p.index1)] @ v[key(p.name2, p.index2)]) for p in pairs])
        r = verification_report(scores, labels, folds)
        report.update({f"{teacher}_val_accuracy": r["accuracy"], f"{teacher}_val_auc": r["auc"],
                       f"{teacher}_val_tar_at_far_1e-3": r["tar_at_far_1e-3"]})
    print(json.dumps(report))
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from facewatch.training.embedder_data import DEFAULT_DETECTOR

    parser.add_argument("--images", type=Path, default=None, help="LFW folder")
    parser.add_argument("--detector", type=Path, default=DEFAULT_DETECTOR,
                        help="face detector ONNX whose boxes the faces use")
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument("--teacher", choices=("dlib", "sface", "both"), default="dlib",
                        help="dlib: the ResNet on our detector's LFW boxes (the cache train-embedder "
                             "reads); sface / both: YuNet + SFace (+ dlib on YuNet's box), chunked "
                             "and resumable (with --folder: dlib on YuNet's box, SFace or both)")
    parser.add_argument("--val-pairs", type=int, default=None,
                        help="LFW with --teacher sface/both: only the images of this many evenly "
                             "spread validation pairs (a quick check of the teacher)")
    unlabelled_teacher.add_arguments(parser)
    folder_teacher.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from facewatch.training.lfw import default_images_dir

    if args.unlabelled:
        if args.teacher != "dlib" or args.folder:
            raise ValueError("--unlabelled caches dlib's vectors of WIDER and clip faces: it takes "
                             "neither --teacher sface/both nor --folder")
        return unlabelled_teacher.run(args)
    if args.folder:
        return folder_teacher.run(args)
    images = Path(args.images or default_images_dir())
    if args.teacher != "dlib":
        return _lfw_through_folder_cache(args, images)

    cache = load_teacher_cache(images, training_people(images), args.detector, args.workers)
    # The teacher's own score on our validation pairs: the ceiling the student is pulled towards.
    from facewatch.training.lfw import VAL_PAIRS_FILE, read_pairs
    from facewatch.training.verification_metrics import verification_report

    pairs, folds = read_pairs(VAL_PAIRS_FILE)
    e = centred(cache.embeddings)
    scores = np.array([float(e[cache.index[(p.name1, p.index1)]] @ e[cache.index[(p.name2, p.index2)]])
                       for p in pairs])
    report = verification_report(scores, np.array([p.same for p in pairs]), folds)
    print(json.dumps({"faces": len(cache.index), "embedding_dim": int(e.shape[1]),
                      "teacher_val_accuracy": report["accuracy"], "teacher_val_auc": report["auc"],
                      "teacher_val_tar_at_far_1e-3": report["tar_at_far_1e-3"],
                      "pairs": len(pairs)}))
    return 0
