"""dlib teacher embeddings for faces that have no identity label, computed once.

    facewatch teacher-cache --unlabelled [--min-face-px 48] [--frame-step 2] [--workers 2]

The student's distillation loss needs only a teacher vector per face, not an identity, so faces
other than LFW's can teach it too (issue 6, item 2). There are two sources:

- WIDER FACE: every labelled box (the YOLO labels the detector trains on) at least
  `min_face_px` tall, in all images of the shared copy. Below that, dlib's 5-point model and its
  150 px face chip see too few pixels for the vector to mean much.
- The shared clip: our detector (`stages.face_detector`, at `clip_imgsz`: the model's own 320
  finds one face of six in a 1080p frame) and the daemon's tracker (`stages.tracking`, the
  daemon's default settings) over every frame; the tracked faces at least `min_face_px` tall of
  every `frame_step`-th frame are kept, with their track ids.

For each face: its source (image or frame), its box, dlib's five landmarks inside the box, whether
they are plausible (`stages.face_crop.landmarks_plausible`: where they are not, dlib aligned its
chip on a failed fit and the vector describes that, so training leaves such faces out), and
dlib's 128-D unit vector. Written to `runs/teacher_cache/unlabelled-<key>/`: `sources.json`
(the sources, counts, seconds), `source.npy` (N,) row -> source, `track_ids.npy` (-1 for WIDER),
`boxes.npy`, `landmarks.npy`, `plausible.npy`, then `embeddings.npy` last (it marks completion).
The key covers the WIDER labels, the clip's and detector's content and every setting.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from facewatch.training.paths import require_dir, runs_dir, shared_data_dir

log = logging.getLogger("facewatch.unlabelled_teacher")

MIN_FACE_PX = 48.0
FRAME_STEP = 2
# The clip is 1080p; at the detector's own 320 its faces are ~20 px and most are missed
# (1 of 6 found on the first frame, 7-9 at 1280, the false ones all under 48 px tall).
CLIP_IMGSZ = 1280
CACHE_VERSION = 1
ARRAYS = ("source", "track_ids", "boxes", "landmarks", "plausible", "embeddings")  # embeddings last


def default_widerface_dir() -> Path:
    return shared_data_dir() / "widerface"


def default_video() -> Path:
    return shared_data_dir() / "videos" / "facenet_pytorch_video.mp4"


@dataclass(frozen=True)
class FaceSource:
    """Where a face was seen: a WIDER image (relative to `images/`) or a frame of a video."""
    kind: str        # "widerface" or "clip"
    path: str        # WIDER: "<event>/<name>.jpg"; clip: the video file
    frame: int = -1  # clip: 0-based frame number; -1 for a still image


@dataclass
class UnlabelledFaces:
    """The cached faces: parallel arrays, one row a face."""
    folder: Path
    widerface_root: Path
    sources: list[FaceSource]
    source: np.ndarray       # (N,) int32 index into `sources`
    track_ids: np.ndarray    # (N,) int64, the tracker's id for clip faces, -1 for WIDER
    boxes: np.ndarray        # (N, 4) float32 x1, y1, x2, y2 pixels of the source
    landmarks: np.ndarray    # (N, 5, 2) float32, dlib's order
    plausible: np.ndarray    # (N,) bool: dlib's landmarks passed landmarks_plausible
    embeddings: np.ndarray   # (N, 128) float32 unit vectors, not centred
    report: dict             # counts per source, exclusions, seconds

    def __len__(self) -> int:
        return len(self.source)

    @property
    def key(self) -> str:
        return self.folder.name

    def kinds(self) -> np.ndarray:
        """(N,) the source kind of each face ("widerface" or "clip")."""
        return np.array([self.sources[i].kind for i in self.source])

    def frames(self) -> Iterator[tuple[int, np.ndarray]]:
        """(source index, BGR image) of every source, in order; the clip is decoded once."""
        clip = [i for i, s in enumerate(self.sources) if s.kind == "clip"]
        for i, s in enumerate(self.sources):
            if s.kind == "widerface":
                yield i, _read(self.widerface_root / "images" / s.path)
        if clip:
            by_frame = {self.sources[i].frame: i for i in clip}
            for frame_no, frame in iter_video_frames(Path(self.sources[clip[0]].path), set(by_frame)):
                yield by_frame[frame_no], frame


def _read(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise FileNotFoundError(f"cannot read image {path}")
    return image


def iter_video_frames(video: Path, wanted: set[int] | None = None,
                      max_frames: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """(frame number, BGR frame) of the video's frames in order (those in `wanted` only)."""
    cap = cv2.VideoCapture(str(video))
    if not cap.isOpened():
        raise FileNotFoundError(f"cannot open video {video}")
    last = max(wanted) if wanted else None
    try:
        n = 0
        while (max_frames is None or n < max_frames) and (last is None or n <= last):
            ok, frame = cap.read()
            if not ok:
                break
            if wanted is None or n in wanted:
                yield n, frame
            n += 1
    finally:
        cap.release()


# ---------------------------------------------------------------------------- the faces' boxes
def widerface_images(root: Path, max_images: int | None = None) -> list[str]:
    """Every labelled image ("<event>/<name>.jpg"), sorted; `max_images` evenly spread (tests)."""
    images = require_dir(Path(root) / "images", "WIDER FACE images folder")
    rels = sorted(p.relative_to(images).as_posix() for p in images.glob("*/*.jpg")
                  if (Path(root) / "labels" / p.relative_to(images)).with_suffix(".txt").is_file())
    if max_images:
        rels = rels[:: max(1, len(rels) // max_images)][:max_images]
    return rels


def widerface_boxes(root: Path, rels: list[str], min_face_px: float
                    ) -> tuple[list[tuple[str, np.ndarray]], dict]:
    """[(image, (K, 4) boxes at least min_face_px tall)] for images with any, and counts."""
    from PIL import Image

    from facewatch.training.widerface_landmarks import read_yolo_boxes

    kept, faces, small = [], 0, 0
    for rel in rels:
        with Image.open(Path(root) / "images" / rel) as im:   # header only
            width, height = im.size
        boxes = read_yolo_boxes((Path(root) / "labels" / rel).with_suffix(".txt"), width, height)
        tall = (boxes[:, 3] - boxes[:, 1]) >= min_face_px
        faces += len(boxes)
        small += int((~tall).sum())
        if tall.any():
            kept.append((rel, boxes[tall]))
    return kept, {"images": len(rels), "images_with_faces": len(kept), "labelled_faces": faces,
                  "under_min_px": small}


def track_clip(video: Path, detector: Path, min_face_px: float, frame_step: int = FRAME_STEP,
               max_frames: int | None = None, imgsz: int = CLIP_IMGSZ
               ) -> tuple[list[tuple[int, np.ndarray, np.ndarray]], dict]:
    """Detector and tracker over the clip's frames, as the daemon runs them: [(frame number,
    (K, 4) tracked boxes at least min_face_px tall, (K,) track ids)] every frame_step-th frame."""
    from facewatch.daemon.config import DetectConfig, ModelsConfig
    from facewatch.stages.face_detector import FaceDetector
    from facewatch.stages.tracking import CameraTracker, tracker_args

    if not Path(detector).is_file():
        raise FileNotFoundError(f"the clip's faces need the face detector: {detector} not found")
    detect_cfg = DetectConfig()
    conf = ModelsConfig.model_fields["detector_conf"].default
    model = FaceDetector(detector, providers=("CPUExecutionProvider",), conf_threshold=conf,
                         imgsz=imgsz)
    tracker = CameraTracker(detect_cfg.tracker, tracker_args(detect_cfg.tracker, detect_cfg))
    kept, frames, tracked, small, ids = [], 0, 0, 0, set()
    for n, frame in iter_video_frames(video, max_frames=max_frames):
        frames += 1
        tracks = tracker.update(model.detect([frame])[0], frame)
        if n % frame_step:
            continue
        tall = (tracks.boxes[:, 3] - tracks.boxes[:, 1]) >= min_face_px
        tracked += len(tracks)
        small += int((~tall).sum())
        if tall.any():
            kept.append((n, tracks.boxes[tall], tracks.track_ids[tall]))
            ids |= {int(i) for i in tracks.track_ids[tall]}
    if frames == 0:
        raise ValueError(f"no frame could be decoded from {video}")
    return kept, {"frames": frames, "frames_used": len(range(0, frames, frame_step)),
                  "frames_with_faces": len(kept), "tracked_faces": tracked, "under_min_px": small,
                  "tracks": len(ids), "detector": Path(detector).name, "imgsz": imgsz,
                  "tracker": detect_cfg.tracker, "detector_conf": conf}


# ---------------------------------------------------------------------------- dlib, in a pool
@dataclass(frozen=True)
class _Job:
    kind: str                                  # "widerface" or "clip"
    path: str                                  # WIDER root or the video file
    items: list                                # [(image or frame number, boxes)]


def _describe_job(job: _Job) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(landmarks (K, 5, 2), unit vectors (K, 128))] for each item of the job, in order."""
    from facewatch.training.dlib_teacher import DlibTeacher

    teacher = DlibTeacher()
    if job.kind == "widerface":
        frames = ((rel, _read(Path(job.path) / "images" / rel)) for rel, _ in job.items)
    else:
        frames = iter_video_frames(Path(job.path), {n for n, _ in job.items})
    boxes = dict(job.items)
    out = {}
    for name, frame in frames:
        out[name] = teacher.describe(frame[..., ::-1], boxes[name])
    missing = [name for name, _ in job.items if name not in out]
    if missing:
        raise ValueError(f"{job.path}: could not read {missing[:5]}")
    return [out[name] for name, _ in job.items]


def _cache_folder(cache_root: Path, root: Path, rels: list[str], video: Path | None,
                  detector: Path | None, settings: dict) -> Path:
    from facewatch.stages.gallery import file_sha256

    digest = hashlib.sha1()
    digest.update(json.dumps({
        "version": CACHE_VERSION, "widerface": str(Path(root).resolve()), "settings": settings,
        "video": file_sha256(video) if video else None,
        "detector": file_sha256(detector) if video else None}).encode())
    for rel in rels:
        digest.update(rel.encode())
        digest.update((Path(root) / "labels" / rel).with_suffix(".txt").read_bytes())
    return Path(cache_root) / f"unlabelled-{digest.hexdigest()[:16]}"


def _load(folder: Path) -> UnlabelledFaces:
    meta = json.loads((folder / "sources.json").read_text())
    arrays = {name: np.load(folder / f"{name}.npy") for name in ARRAYS}
    return UnlabelledFaces(folder, Path(meta["widerface_root"]),
                           [FaceSource(**s) for s in meta["sources"]], report=meta["report"], **arrays)


def load_unlabelled_faces(widerface_root: Path | None = None, video: Path | None = None,
                          detector: Path | None = None, min_face_px: float = MIN_FACE_PX,
                          frame_step: int = FRAME_STEP, clip_imgsz: int = CLIP_IMGSZ,
                          max_images: int | None = None, max_frames: int | None = None,
                          workers: int = 2, cache_root: Path | None = None,
                          use_video: bool = True) -> UnlabelledFaces:
    """The cached unlabelled faces, computed (once) on the first call with these inputs.

    `max_images` (evenly spread) and `max_frames` (the clip's first frames) restrict the inputs
    for tests; `use_video=False` leaves the clip out."""
    from facewatch.training.embedder_data import DEFAULT_DETECTOR

    if min_face_px <= 0 or frame_step < 1:
        raise ValueError(f"min_face_px must be > 0 and frame_step >= 1, got {min_face_px}, {frame_step}")
    root = Path(widerface_root or default_widerface_dir())
    video = Path(video or default_video()) if use_video else None
    detector = Path(detector or DEFAULT_DETECTOR)
    if video is not None and not video.is_file():
        raise FileNotFoundError(f"clip not found: {video} (set FACEWATCH_DATA or pass --video)")
    if video is not None and not detector.is_file():
        raise FileNotFoundError(f"the clip's faces need the face detector: {detector} not found")
    rels = widerface_images(root, max_images)
    settings = {"min_face_px": min_face_px, "frame_step": frame_step, "clip_imgsz": clip_imgsz,
                "max_frames": max_frames}
    folder = _cache_folder(cache_root or runs_dir() / "teacher_cache", root, rels, video,
                           detector, settings)
    if (folder / "embeddings.npy").is_file() and (folder / "sources.json").is_file():
        return _load(folder)

    start = time.monotonic()
    wider, wider_report = widerface_boxes(root, rels, min_face_px)
    clip, clip_report = ([], {})
    if video is not None:
        clip, clip_report = track_clip(video, detector, min_face_px, frame_step, max_frames, clip_imgsz)
    sources = ([FaceSource("widerface", rel) for rel, _ in wider]
               + [FaceSource("clip", str(video), n) for n, _, _ in clip])
    counts = [len(b) for _, b in wider] + [len(b) for _, b, _ in clip]
    jobs = [_Job("widerface", str(root), wider[s:s + 16]) for s in range(0, len(wider), 16)]
    jobs += [_Job("clip", str(video), [(n, b) for n, b, _ in clip[s:s + 8]])
             for s in range(0, len(clip), 8)]
    print(f"unlabelled teacher cache: {sum(counts)} faces ({sum(counts[:len(wider)])} WIDER, "
          f"{sum(counts[len(wider):])} clip; boxes in {time.monotonic() - start:.0f} s) through dlib "
          f"in {len(jobs)} chunks, {workers} workers (once; cached in {folder})", flush=True)
    parts = []
    with ProcessPoolExecutor(max(1, workers)) as pool:
        for n, part in enumerate(pool.map(_describe_job, jobs), 1):
            parts.extend(part)
            if n % 10 == 0 or n == len(jobs):
                print(f"  {n}/{len(jobs)} chunks, {time.monotonic() - start:.0f} s", flush=True)
    boxes = [b for _, b in wider] + [b for _, b, _ in clip]
    arrays = _assemble(boxes, [t for _, _, t in clip], len(wider), parts)
    seconds = round(time.monotonic() - start, 1)
    report = {"widerface_faces": sum(counts[:len(wider)]), "clip_faces": sum(counts[len(wider):]),
              "implausible_landmarks": int((~arrays["plausible"]).sum()),
              "min_face_px": min_face_px, "seconds": seconds,
              "widerface": wider_report, "clip": clip_report}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sources.json").write_text(json.dumps({
        "widerface_root": str(root.resolve()), "report": report, "settings": settings,
        "sources": [asdict(s) for s in sources]}))
    for name in ARRAYS:
        np.save(folder / f"{name}.tmp.npy", arrays[name])
    for name in ARRAYS:  # embeddings last: it marks completion
        (folder / f"{name}.tmp.npy").replace(folder / f"{name}.npy")
    return UnlabelledFaces(folder, root.resolve(), sources, report=report, **arrays)


def _assemble(boxes: list[np.ndarray], track_ids: list[np.ndarray], wider_sources: int,
              parts: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    from facewatch.stages.face_crop import landmarks_plausible

    if not boxes:
        raise ValueError("no face at least min_face_px tall in the WIDER images or the clip")
    source = np.concatenate([np.full(len(b), i, np.int32) for i, b in enumerate(boxes)])
    ids = np.concatenate([np.full(sum(len(b) for b in boxes[:wider_sources]), -1, np.int64)]
                         + [np.asarray(t, np.int64) for t in track_ids])
    box = np.concatenate(boxes).astype(np.float32)
    points = np.concatenate([p for p, _ in parts]).astype(np.float32)
    vectors = np.concatenate([v for _, v in parts]).astype(np.float32)
    plausible = np.array([landmarks_plausible(p, b) for p, b in zip(points, box)], bool)
    return {"source": source, "track_ids": ids, "boxes": box, "landmarks": points,
            "plausible": plausible, "embeddings": vectors}


# ---------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`facewatch teacher-cache --unlabelled` options (the command's --detector and --workers too)."""
    a = parser.add_argument
    a("--unlabelled", action="store_true",
      help="cache the unlabelled faces (WIDER FACE boxes, the clip's tracked faces) instead of LFW")
    a("--widerface", type=Path, default=None,
      help=f"WIDER FACE folder with images/ and labels/ (default {default_widerface_dir()})")
    a("--video", type=Path, default=None, help=f"the clip (default {default_video()})")
    a("--min-face-px", type=float, default=MIN_FACE_PX, help="keep faces at least this tall")
    a("--frame-step", type=int, default=FRAME_STEP, help="keep the clip's faces every N frames")
    a("--clip-imgsz", type=int, default=CLIP_IMGSZ, help="detector input size on the clip")
    a("--max-images", type=int, default=None,
      help="WIDER images (--unlabelled) or photos of each --folder, evenly spread (tests, trials)")
    a("--max-frames", type=int, default=None, help="the clip's first frames only (tests)")


def run(args: argparse.Namespace) -> int:
    faces = load_unlabelled_faces(args.widerface, args.video, args.detector, args.min_face_px,
                                  args.frame_step, args.clip_imgsz, args.max_images,
                                  args.max_frames, args.workers)
    r = faces.report
    print(json.dumps({"widerface_faces": r["widerface_faces"], "clip_faces": r["clip_faces"],
                      "widerface_images": r["widerface"].get("images_with_faces"),
                      "widerface_under_min_px": r["widerface"].get("under_min_px"),
                      "clip_frames_used": r["clip"].get("frames_used"),
                      "clip_tracks": r["clip"].get("tracks"),
                      "clip_under_min_px": r["clip"].get("under_min_px"),
                      "implausible_landmarks": r["implausible_landmarks"],
                      "min_face_px": r["min_face_px"], "build_seconds": r["seconds"],
                      "cache": str(faces.folder)}))
    return 0
