"""Teacher vectors for any folder of face photos: incremental, resumable, with progress.

    facewatch teacher-cache --folder DIR [--folder DIR ...] --teacher sface|dlib|both
                            [--max-images N] [--chunk 128] [--workers 1]

One face per photo (the folders are face photos: UTKFace's and CelebA's aligned crops, LFW):
YuNet's face nearest the photo's centre with score >= 0.5 (`training.sface_teacher`); a photo
where YuNet finds none keeps a row with `detected` False, the centre box of the photo and the box
fallback's points, and is marked implausible (training leaves it out, an evaluation can still
score it). Per face: the photo's path relative to the folder, the box, YuNet's five points
(ArcFace order) and whether they are plausible, and, per teacher, its 128-D unit vector (SFace on
the ArcFace-aligned crop; dlib on its own chip, with dlib's five points from YuNet's box and
their plausibility).

Written to `runs/teacher_cache/folder-<folder name>-<key>/` as chunks (`chunk-<hash>.npz`, each
renamed into place when complete), so an interrupted run loses at most the chunks in flight and
a rerun computes only the photos no chunk holds (more photos, a larger `--max-images`: only the
new ones). The key covers the folder's path, the teachers and the model files, not the photo
list; a one-teacher run also reads the `both` cache of the same folder, so photos done there are
not done again. Each finished chunk prints one JSON progress line (photos done / total, photos per second,
ETA). An unreadable photo is named in a warning, recorded in its chunk and skipped.
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

import cv2
import numpy as np

from facewatch.training.paths import runs_dir

log = logging.getLogger("facewatch.folder_teacher")

CACHE_VERSION = 1
TEACHERS = ("sface", "dlib", "both")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
CHUNK = 128
# A photo without a YuNet face: its face is assumed to sit in this box (fractions of the photo),
# the LFW centre box (`training.embedder_data.LFW_CENTRE_BOX` / 250), which also frames aligned crops.
CENTRE_BOX = np.array([0.32, 0.288, 0.68, 0.728], np.float32)
FIELDS = ("paths", "detected", "scores", "boxes", "yunet_points", "yunet_plausible",
          "sface", "dlib_points", "dlib_plausible", "dlib")


def uses(teacher: str, name: str) -> bool:
    return teacher == name or teacher == "both"


def list_images(folder: Path) -> list[str]:
    """Every photo under `folder` (recursively), as sorted POSIX paths relative to it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"face photo folder not found: {folder} (expected a directory of "
                                f"{'/'.join(IMAGE_SUFFIXES)} files)")
    rels = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not rels:
        raise FileNotFoundError(f"no face photos ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    return rels


def spread(items: list, count: int | None) -> list:
    """`count` items evenly spread over the list (all of them for None)."""
    if not count or count >= len(items):
        return list(items)
    step = len(items) / count
    return [items[int(i * step)] for i in range(count)]


def cache_folder(folder: Path, teacher: str, cache_root: Path | None = None) -> Path:
    from facewatch.stages.gallery import file_sha256
    from facewatch.training.wheel_models import SFACE, YUNET, wheel_model_path

    models = {"yunet": file_sha256(wheel_model_path(YUNET))}
    if uses(teacher, "sface"):
        models["sface"] = file_sha256(wheel_model_path(SFACE))
    if uses(teacher, "dlib"):
        models["dlib"] = "dlib_face_recognition_resnet_model_v1+shape_predictor_5_face_landmarks"
    key = hashlib.sha1(json.dumps({"version": CACHE_VERSION, "folder": str(Path(folder).resolve()),
                                   "teacher": teacher, "models": models}).encode()).hexdigest()[:12]
    name = Path(folder).resolve().name or "root"
    return Path(cache_root or runs_dir() / "teacher_cache") / f"folder-{name}-{key}"


# ---------------------------------------------------------------------------- one chunk
@dataclass(frozen=True)
class _Chunk:
    folder: str
    rels: tuple[str, ...]
    teacher: str
    out: str           # the cache folder


def chunk_name(rels) -> str:
    return "chunk-" + hashlib.sha1("\n".join(rels).encode()).hexdigest()[:16] + ".npz"


_WORKER: dict = {}


def _teachers(teacher: str):
    """The process's teacher objects, made once per worker."""
    if teacher not in _WORKER:
        from facewatch.training.sface_teacher import SFaceTeacher

        dlib = None
        if uses(teacher, "dlib"):
            from facewatch.training.dlib_teacher import DlibTeacher

            dlib = DlibTeacher()
        _WORKER[teacher] = (SFaceTeacher(embeddings=uses(teacher, "sface")), dlib)
    return _WORKER[teacher]


def describe_photo(image_bgr: np.ndarray, sface, dlib, teacher: str) -> dict:
    """One photo's row (every field but `paths`)."""
    from facewatch.stages.face_crop import box_landmarks, landmarks_plausible
    from facewatch.training.dlib_teacher import TEACHER_DIM
    from facewatch.training.sface_teacher import SFACE_DIM, plausible

    face = sface.central_face(image_bgr)
    if face is None:
        h, w = image_bgr.shape[:2]
        box = CENTRE_BOX * np.array([w, h, w, h], np.float32)
        points, score = box_landmarks(box, "arcface_five_point"), 0.0
    else:
        box, points, score = face
    row = {"detected": face is not None, "scores": np.float32(score),
           "boxes": np.asarray(box, np.float32), "yunet_points": np.asarray(points, np.float32),
           "yunet_plausible": face is not None and plausible(points, box),
           "sface": (sface.embed(image_bgr, points[None])[0] if uses(teacher, "sface")
                     else np.zeros(SFACE_DIM, np.float32)),
           "dlib_points": np.zeros((5, 2), np.float32), "dlib_plausible": False,
           "dlib": np.zeros(TEACHER_DIM, np.float32)}
    if dlib is not None:
        p, v = dlib.describe(np.ascontiguousarray(image_bgr[..., ::-1]), np.asarray(box)[None])
        row.update(dlib_points=p[0], dlib=v[0],
                   dlib_plausible=face is not None and landmarks_plausible(p[0], box, "dlib"))
    return row


def _run_chunk(job: _Chunk) -> dict:
    sface, dlib = _teachers(job.teacher)
    start, cpu = time.monotonic(), time.process_time()
    rows, unreadable = [], []
    for rel in job.rels:
        image = cv2.imread(str(Path(job.folder) / rel), cv2.IMREAD_COLOR)
        if image is None or image.size == 0:
            unreadable.append(rel)
            continue
        rows.append({"paths": rel, **describe_photo(image, sface, dlib, job.teacher)})
    arrays = {f: np.array([r[f] for r in rows]) for f in FIELDS} if rows else _empty_arrays()
    arrays["paths"] = np.array([r["paths"] for r in rows], dtype=str)
    out = Path(job.out) / chunk_name(job.rels)
    tmp = out.with_suffix(".tmp.npz")
    np.savez(tmp, unreadable=np.array(unreadable, dtype=str), listed=np.array(job.rels, dtype=str),
             seconds=np.float64(time.monotonic() - start), cpu_seconds=np.float64(time.process_time() - cpu),
             **arrays)
    tmp.replace(out)
    return {"photos": len(job.rels), "faces": len(rows), "unreadable": unreadable,
            "seconds": time.monotonic() - start, "cpu_seconds": time.process_time() - cpu}


def _empty_arrays() -> dict:
    return {"paths": np.zeros(0, str), "detected": np.zeros(0, bool), "scores": np.zeros(0, np.float32),
            "boxes": np.zeros((0, 4), np.float32), "yunet_points": np.zeros((0, 5, 2), np.float32),
            "yunet_plausible": np.zeros(0, bool), "sface": np.zeros((0, 128), np.float32),
            "dlib_points": np.zeros((0, 5, 2), np.float32), "dlib_plausible": np.zeros(0, bool),
            "dlib": np.zeros((0, 128), np.float32)}


# ---------------------------------------------------------------------------- the cache
@dataclass
class FolderFaces:
    """The cached faces of one folder: parallel arrays, one row a photo (in `paths` order)."""
    folder: Path            # the photos
    cache: Path             # where the chunks are
    teacher: str
    paths: np.ndarray       # (N,) str, relative to `folder`
    detected: np.ndarray    # (N,) bool: YuNet found the face (else the centre-box fallback)
    scores: np.ndarray      # (N,) YuNet's score (0 when not detected)
    boxes: np.ndarray       # (N, 4) float32 x1, y1, x2, y2 photo pixels
    yunet_points: np.ndarray     # (N, 5, 2) ArcFace/YuNet order
    yunet_plausible: np.ndarray  # (N,) bool
    sface: np.ndarray            # (N, 128) unit vectors (zeros without the SFace teacher)
    dlib_points: np.ndarray      # (N, 5, 2) dlib order, from YuNet's box (zeros without dlib)
    dlib_plausible: np.ndarray   # (N,) bool
    dlib: np.ndarray             # (N, 128) unit vectors (zeros without the dlib teacher)
    unreadable: list[str]

    def __len__(self) -> int:
        return len(self.paths)

    def index(self) -> dict[str, int]:
        return {p: i for i, p in enumerate(self.paths)}

    def vectors(self, teacher: str) -> np.ndarray:
        if not uses(self.teacher, teacher) or teacher == "both":
            raise ValueError(f"cache {self.cache} holds teacher {self.teacher!r}, not {teacher!r}")
        return self.sface if teacher == "sface" else self.dlib


def _read_chunks(*caches: Path) -> list[dict]:
    chunks = []
    for path in sorted(p for cache in caches for p in Path(cache).glob("chunk-*.npz")):
        if path.name.endswith(".tmp.npz"):
            continue
        with np.load(path) as z:
            chunks.append({k: z[k] for k in z.files})
    return chunks


def load_folder_faces(folder: Path, teacher: str = "sface", max_images: int | None = None,
                      files: list[str] | None = None, chunk: int = CHUNK, workers: int = 1,
                      cache_root: Path | None = None, progress=None) -> FolderFaces:
    """Every wanted photo of `folder` through the teachers, computing only what no chunk holds.

    `files` (relative paths) or `max_images` (evenly spread over the sorted listing) restrict the
    photos; rows come back in the wanted photos' order, unreadable ones left out."""
    if teacher not in TEACHERS:
        raise ValueError(f"teacher must be one of {TEACHERS}, got {teacher!r}")
    if chunk < 1 or workers < 1:
        raise ValueError(f"chunk and workers must be >= 1, got {chunk}, {workers}")
    folder = Path(folder)
    wanted = list(files) if files is not None else spread(list_images(folder), max_images)
    if files is not None and not folder.is_dir():
        raise FileNotFoundError(f"face photo folder not found: {folder}")
    cache = cache_folder(folder, teacher, cache_root)
    cache.mkdir(parents=True, exist_ok=True)
    for stale in cache.glob("*.tmp.npz"):      # a chunk cut short by an interruption
        stale.unlink()
    sources = [cache]
    if teacher != "both" and cache_folder(folder, "both", cache_root).is_dir():
        sources.append(cache_folder(folder, "both", cache_root))   # holds both teachers' vectors
    done: set[str] = set()
    for c in _read_chunks(*sources):
        done.update(str(p) for p in c["listed"])
    todo = [rel for rel in wanted if rel not in done]
    jobs = [_Chunk(str(folder), tuple(todo[s:s + chunk]), teacher, str(cache))
            for s in range(0, len(todo), chunk)]
    if jobs:
        _compute(jobs, folder, len(wanted), len(wanted) - len(todo), workers,
                 progress or (lambda line: print(line, flush=True)))
    return _assemble(folder, cache, teacher, wanted, sources)


def _compute(jobs: list[_Chunk], folder: Path, total: int, already: int, workers: int,
             progress) -> None:
    start, done, cpu = time.monotonic(), already, 0.0
    progress(json.dumps({"event": "start", "folder": str(folder), "photos": total,
                         "done": already, "chunks_to_do": len(jobs), "workers": workers}))
    if workers == 1:
        results = map(_run_chunk, jobs)
        pool = None
    else:
        pool = ProcessPoolExecutor(workers)
        results = pool.map(_run_chunk, jobs)
    try:
        for n, r in enumerate(results, 1):
            done += r["photos"]
            cpu += r["cpu_seconds"]
            for rel in r["unreadable"]:
                log.warning("unreadable image skipped: %s", Path(folder) / rel)
            elapsed = time.monotonic() - start
            rate = (done - already) / max(elapsed, 1e-9)
            progress(json.dumps({"event": "progress", "folder": str(folder), "done": done,
                                 "total": total, "chunk": n, "chunks": len(jobs),
                                 "photos_per_s": round(rate, 2),
                                 "cpu_s_per_photo": round(cpu / max(1, done - already), 4),
                                 "eta_s": round((total - done) / max(rate, 1e-9)),
                                 "unreadable": r["unreadable"]}))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def _assemble(folder: Path, cache: Path, teacher: str, wanted: list[str],
              sources: list[Path]) -> FolderFaces:
    chunks = _read_chunks(*sources)
    unreadable = sorted({str(p) for c in chunks for p in c["unreadable"]} & set(wanted))
    merged = {f: np.concatenate([c[f] for c in chunks]) if chunks else _empty_arrays()[f]
              for f in FIELDS}
    where = {str(p): i for i, p in enumerate(merged["paths"])}
    rows = np.array([where[rel] for rel in wanted if rel in where], np.int64)
    skipped = set(unreadable)
    missing = [rel for rel in wanted if rel not in where and rel not in skipped]
    if missing:
        raise RuntimeError(f"teacher cache {cache}: {len(missing)} photos missing after the run, "
                           f"e.g. {missing[:3]}")
    return FolderFaces(folder, cache, teacher, unreadable=unreadable,
                       **{f: merged[f][rows] for f in FIELDS})


def cache_bytes(cache: Path) -> int:
    return sum(p.stat().st_size for p in Path(cache).glob("chunk-*.npz"))


# ---------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`facewatch teacher-cache --folder` options (the command's --teacher and --workers too)."""
    a = parser.add_argument
    a("--folder", type=Path, action="append", default=None,
      help="a folder of face photos (recursively; one face each, YuNet's nearest the centre); "
           "repeat for several")
    a("--chunk", type=int, default=CHUNK, help="photos per chunk (the unit of resume)")


def summary(faces: FolderFaces, seconds: float) -> dict:
    out = {"folder": str(faces.folder), "teacher": faces.teacher, "photos": len(faces),
           "detected": int(faces.detected.sum()), "yunet_plausible": int(faces.yunet_plausible.sum()),
           "unreadable": len(faces.unreadable), "cache": str(faces.cache),
           "cache_mb": round(cache_bytes(faces.cache) / 2**20, 2), "seconds": round(seconds, 1)}
    if uses(faces.teacher, "dlib"):
        out["dlib_plausible"] = int(faces.dlib_plausible.sum())
    return out


def run(args: argparse.Namespace) -> int:
    for folder in args.folder:
        start = time.monotonic()
        faces = load_folder_faces(folder, args.teacher, args.max_images, chunk=args.chunk,
                                  workers=args.workers)
        print(json.dumps({"event": "done", **summary(faces, time.monotonic() - start)}), flush=True)
    return 0
