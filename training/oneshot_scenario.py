"""`facewatch evaluate-oneshot`: one-shot recognition scored end to end on a generated video.

The validation people of the people-disjoint LFW split (never seen in training) are drawn in a
seeded order. The first `--unknown` are never enrolled; the next ones are enrolled from one photo
each (the first of their photos that the real enrollment path accepts; a refused photo is
counted and the next one tried) until `--enrolled` people are in the gallery. Up to
`--per-person` of each person's *other* photos then appear in a video: the 250 px LFW photo,
scaled to 120..200 px behind a soft elliptical mask, moves across a textured background for
1.5..2 s in one of three horizontal lanes, so up to three people are in view at once; a lane
stays empty for 1.3..1.7 s between people (longer than the tracker keeps a lost track).

The real daemon (`facewatch run`, config built as `facewatch demo` builds it; every frame
processed unless `--realtime`) runs on the file, and each recognition decision of its event log
is matched to the appearance whose ground-truth face box at that frame overlaps the event's box
best (IoU >= 0.3). An appearance is scored by its first decision: correct, wrong (another
enrolled name), miss (unknown although enrolled), or undetected (no decision at all); for a
person who is not enrolled: rejected (unknown), false accept (named) or undetected. One JSON line
is printed (and written to `result.json` in the work folder):

    facewatch evaluate-oneshot [--enrolled 60 --unknown 15 | --quick] [--detector D --embedder E]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from facewatch.stages.gallery import file_sha256
from facewatch.training.lfw import default_images_dir, image_path, list_people, load_split
from facewatch.training.paths import REPO_ROOT, runs_dir

MODELS_DIR = REPO_ROOT / "models"

log = logging.getLogger("facewatch.oneshot")

FPS = 25
CANVAS = (1280, 720)                        # w, h
LANES = 3                                   # horizontal bands, one person at a time in each
PATCH_PX = (120, 200)                       # side of the pasted 250 px LFW photo, inclusive
SECONDS_IN_VIEW = (1.5, 2.0)
SECONDS_BETWEEN = (1.3, 1.7)                # per lane: more than detect.track_buffer (30 frames)
SPEED_PX_S = (100.0, 300.0)
TAIL_SECONDS = 1.5                          # after the last appearance: tracks end, late decisions
# Where the face is in an LFW deep-funneled photo (faces are aligned there), as fractions of the
# photo's side: the median box of models/face_detector.onnx on 60 validation photos,
# x 75..174, y 60..192 of 250 px.
FACE_BOX = (0.30, 0.24, 0.70, 0.77)
MIN_IOU = 0.3
DEFAULTS = {"enrolled": 60, "unknown": 15, "per_person": 3}
QUICK = {"enrolled": 6, "unknown": 2, "per_person": 2}
DECISIONS = ("recognized", "unknown")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=Path, default=None, help="LFW deep-funneled folder "
                        "(default: $FACEWATCH_DATA/lfw/lfw-deepfunneled)")
    parser.add_argument("--detector", type=Path, default=MODELS_DIR / "face_detector.onnx",
                        help="face detector ONNX (default: the repository's models/)")
    parser.add_argument("--embedder", type=Path, default=MODELS_DIR / "face_embedder.onnx",
                        help="face embedder ONNX (default: the repository's models/)")
    parser.add_argument("--landmarks", type=Path, default=MODELS_DIR / "face_landmarks.onnx",
                        help="landmark model, for an embedder that aligns on five points")
    parser.add_argument("--enrolled", type=int, default=None,
                        help=f"people enrolled from one photo (default {DEFAULTS['enrolled']})")
    parser.add_argument("--unknown", type=int, default=None,
                        help=f"people shown but never enrolled (default {DEFAULTS['unknown']})")
    parser.add_argument("--per-person", type=int, default=None,
                        help=f"appearances per person at most (default {DEFAULTS['per_person']})")
    parser.add_argument("--quick", action="store_true",
                        help=f"a short scenario for tests: {QUICK} unless given explicitly")
    parser.add_argument("--seed", type=int, default=0, help="people, order, sizes and motion")
    parser.add_argument("--realtime", action="store_true", help="pace the file at 25 fps and let "
                        "the daemon drop frames when behind (default: every frame is processed)")
    parser.add_argument("--detector-imgsz", type=int, default=None,
                        help="models.detector_imgsz (default: the detector's own)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="match.threshold (default: the embedder's metadata)")
    parser.add_argument("--workdir", type=Path, default=None, help="default runs/oneshot")
    parser.add_argument("--timeout", type=float, default=1200.0,
                        help="stop the daemon after this many seconds")


# --- the scenario ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Person:
    person: str                 # LFW folder name
    name: str | None            # gallery name when enrolled, else None
    enroll_photo: str | None
    photos: tuple[str, ...]     # shown in the video


@dataclass(frozen=True)
class Appearance:
    """One photo of one person crossing the frame in a straight line, frames first..last."""
    person: str
    name: str | None            # the gallery name the daemon should say, None: not enrolled
    photo: str
    first: int
    last: int
    size: int                   # side of the pasted square, pixels
    x0: int                     # top-left corner at frame `first`
    y0: int
    vx: float                   # pixels per frame

    def rect(self, frame: int) -> tuple[int, int, int, int]:
        x = self.x0 + int(round(self.vx * (frame - self.first)))
        return x, self.y0, x + self.size, self.y0 + self.size

    def face_box(self, frame: int) -> tuple[float, float, float, float]:
        x, y, _, _ = self.rect(frame)
        fx1, fy1, fx2, fy2 = FACE_BOX
        return x + fx1 * self.size, y + fy1 * self.size, x + fx2 * self.size, y + fy2 * self.size


def draw_people(people: dict[str, list[int]], val_people: list[str], n_enrolled: int,
                n_unknown: int, seed: int) -> tuple[list[str], list[str]]:
    """(unknown people, enrollment candidates in order): validation people with >= 2 photos."""
    pool = sorted(n for n in val_people if len(people.get(n, [])) >= 2)
    random.Random(seed).shuffle(pool)
    if n_unknown + n_enrolled > len(pool):
        raise ValueError(f"--enrolled {n_enrolled} + --unknown {n_unknown} is more than the "
                         f"{len(pool)} validation people with two or more photos")
    return pool[:n_unknown], pool[n_unknown:]


def enroll_people(gallery_path: Path, candidates: list[str], n_enrolled: int, images_dir: Path,
                  people: dict[str, list[int]], per_person: int, detector,
                  embedder) -> tuple[list[Person], int]:
    """Enroll candidates one photo each through daemon.enrollment until `n_enrolled` are in.
    Returns the enrolled people and how many photos enrollment refused on the way."""
    from facewatch.daemon.enrollment import EnrollmentError, enroll_images
    from facewatch.stages.gallery import Gallery

    enrolled: list[Person] = []
    refused = 0
    with Gallery(gallery_path) as gallery:
        for person in candidates:
            if len(enrolled) == n_enrolled:
                break
            photos = [image_path(images_dir, person, i) for i in people[person]]
            for photo in photos[:-1]:   # at least one other photo must be left for the video
                try:
                    result = enroll_images(gallery, person, [photo], detector, embedder)
                except EnrollmentError as exc:
                    refused += 1
                    log.info("enrollment refused: %s", exc)
                    continue
                shown = tuple(str(p) for p in photos if p != photo)[:per_person]
                enrolled.append(Person(person, result.name, str(photo), shown))
                break
    if len(enrolled) < n_enrolled:
        raise ValueError(f"only {len(enrolled)} of {n_enrolled} people could be enrolled "
                         f"({refused} photos refused)")
    return enrolled, refused


def unknown_people(names: list[str], images_dir: Path, people: dict[str, list[int]],
                   per_person: int) -> list[Person]:
    """Never enrolled; they show the same photos an enrolled person would (not their first)."""
    return [Person(n, None, None, tuple(str(image_path(images_dir, n, i))
                                        for i in people[n][1:1 + per_person])) for n in names]


def plan_appearances(people: list[Person], seed: int) -> tuple[list[Appearance], int]:
    """Every shown photo once, in a seeded order, each in the lane that frees first.
    Returns the appearances (by first frame) and the video's length in frames."""
    rng = random.Random(seed)
    shows = [(p, photo) for p in people for photo in p.photos]
    rng.shuffle(shows)
    width, height = CANVAS
    lane_h = height // LANES
    free = [round((0.4 + 0.6 * k) * FPS) for k in range(LANES)]   # staggered lane starts
    out: list[Appearance] = []
    for person, photo in shows:
        lane = min(range(LANES), key=lambda k: (free[k], k))
        size = rng.randint(*PATCH_PX)
        frames = round(rng.uniform(*SECONDS_IN_VIEW) * FPS)
        speed = rng.uniform(*SPEED_PX_S) / FPS * (1 if lane % 2 == 0 else -1)
        travel = abs(speed) * (frames - 1)
        lo, hi = (0, width - size - travel) if speed > 0 else (travel, width - size)
        x0 = int(round(rng.uniform(lo, hi)))
        y0 = lane * lane_h + rng.randint(0, lane_h - size)
        first = free[lane]
        out.append(Appearance(person.person, person.name, photo, first, first + frames - 1,
                              size, x0, y0, speed))
        free[lane] = first + frames + round(rng.uniform(*SECONDS_BETWEEN) * FPS)
    out.sort(key=lambda a: (a.first, a.y0))
    total = max((a.last for a in out), default=0) + 1 + round(TAIL_SECONDS * FPS)
    return out, total


def background(seed: int) -> np.ndarray:
    """A muted, smoothly textured wall: low-frequency colour blotches plus finer grain."""
    rng = np.random.default_rng(seed)
    width, height = CANVAS
    coarse = cv2.resize(rng.uniform(60, 170, (9, 16, 3)).astype(np.float32), (width, height),
                        interpolation=cv2.INTER_CUBIC)
    fine = cv2.resize(rng.normal(0, 12, (90, 160, 1)).astype(np.float32), (width, height),
                      interpolation=cv2.INTER_LINEAR)[..., None]
    return np.clip(coarse + fine, 0, 255).astype(np.uint8)


def soft_mask(size: int) -> np.ndarray:
    """(size, size, 1) float32 alpha: an ellipse around the head fading out before the edges."""
    mask = np.zeros((size, size), np.float32)
    axes = (int(0.40 * size), int(0.47 * size))
    cv2.ellipse(mask, (size // 2, size // 2), axes, 0, 0, 360, 1.0, -1)
    return cv2.GaussianBlur(mask, (0, 0), 0.05 * size)[..., None]


def write_video(path: Path, appearances: list[Appearance], total_frames: int, seed: int) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), FPS, CANVAS)
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write {path}")
    wall = background(seed)
    patches: dict[int, tuple[np.ndarray, np.ndarray]] = {}   # appearance index -> (photo, alpha)
    nxt = 0
    try:
        for frame in range(total_frames):
            while nxt < len(appearances) and appearances[nxt].first == frame:
                a = appearances[nxt]
                image = cv2.imread(a.photo, cv2.IMREAD_COLOR)
                if image is None:
                    raise FileNotFoundError(f"cannot read {a.photo}")
                image = cv2.resize(image, (a.size, a.size), interpolation=cv2.INTER_AREA)
                patches[nxt] = (image.astype(np.float32), soft_mask(a.size))
                nxt += 1
            canvas = wall.copy()
            for i in list(patches):
                a = appearances[i]
                if frame > a.last:
                    del patches[i]
                    continue
                x1, y1, x2, y2 = a.rect(frame)
                image, alpha = patches[i]
                region = canvas[y1:y2, x1:x2].astype(np.float32)
                canvas[y1:y2, x1:x2] = (alpha * image + (1 - alpha) * region + 0.5).astype(np.uint8)
            writer.write(canvas)
    finally:
        writer.release()


# --- scoring ---------------------------------------------------------------------------------

def iou(a, b) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def match_event(event: dict, appearances: list[Appearance], fps: float = FPS,
                min_iou: float = MIN_IOU) -> int | None:
    """Index of the appearance this decision is about: in view at its frame, best IoU >= min_iou."""
    frame = int(round(event["frame_pts"] * fps))
    best, best_iou = None, min_iou
    for i, a in enumerate(appearances):
        if a.first <= frame <= a.last:
            overlap = iou(event["bbox"], a.face_box(frame))
            if overlap >= best_iou:
                best, best_iou = i, overlap
    return best


def outcome(appearance: Appearance, event: dict | None) -> str:
    if event is None:
        return "undetected"
    if appearance.name is None:
        return "false_accept" if event["type"] == "recognized" else "rejected"
    if event["type"] != "recognized":
        return "miss"
    return "correct" if event["name"] == appearance.name else "wrong"


def _rate(n: int, of: int) -> float | None:
    return round(n / of, 4) if of else None


def score(appearances: list[Appearance], events: list[dict], fps: float = FPS,
          min_iou: float = MIN_IOU) -> dict:
    """Score each appearance by its first recognition decision (see the module docstring)."""
    decisions = sorted((e for e in events if e["type"] in DECISIONS),
                       key=lambda e: (e["frame_pts"], e.get("seq", 0)))
    per: dict[int, list[dict]] = {}
    unmatched = 0
    for event in decisions:
        i = match_event(event, appearances, fps, min_iou)
        if i is None:
            unmatched += 1
        else:
            per.setdefault(i, []).append(event)
    first = [outcome(a, per[i][0] if i in per else None) for i, a in enumerate(appearances)]
    final = [outcome(a, per[i][-1] if i in per else None) for i, a in enumerate(appearances)]
    known = [k for k, a in enumerate(appearances) if a.name is not None]
    unknown = [k for k, a in enumerate(appearances) if a.name is None]

    def count(outcomes: list[str], which: list[int], what: str) -> int:
        return sum(outcomes[k] == what for k in which)

    latencies = [per[i][0]["frame_pts"] - a.first / fps
                 for i, a in enumerate(appearances) if i in per]
    return {
        "appearances": len(appearances),
        "enrolled_appearances": len(known),
        "unknown_appearances": len(unknown),
        "correct_rate": _rate(count(first, known, "correct"), len(known)),
        "wrong_rate": _rate(count(first, known, "wrong"), len(known)),
        "miss_rate": _rate(count(first, known, "miss"), len(known)),
        "undetected_rate": _rate(count(first, known, "undetected"), len(known)),
        "false_accept_rate": _rate(count(first, unknown, "false_accept"), len(unknown)),
        "unknown_rejected_rate": _rate(count(first, unknown, "rejected"), len(unknown)),
        "unknown_undetected_rate": _rate(count(first, unknown, "undetected"), len(unknown)),
        "final_correct_rate": _rate(count(final, known, "correct"), len(known)),
        "latency_median_s": round(statistics.median(latencies), 3) if latencies else None,
        "latency_max_s": round(max(latencies), 3) if latencies else None,
        "decisions": len(decisions),
        "unmatched_decisions": unmatched,
        "tracks_per_appearance": round(statistics.mean(
            len({e["track_id"] for e in evs}) for evs in per.values()), 3) if per else None,
    }


# --- the command -----------------------------------------------------------------------------


def read_events(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run(args: argparse.Namespace) -> int:
    from facewatch.daemon.file_run import file_config, load_models, run_daemon

    preset = QUICK if args.quick else DEFAULTS
    sizes = {k: preset[k] if getattr(args, k) is None else getattr(args, k) for k in DEFAULTS}
    for k, v in sizes.items():
        least = 0 if k == "unknown" else 1
        if v < least:
            raise ValueError(f"--{k.replace('_', '-')} must be at least {least}, got {v}")
    # Absolute: the daemon runs with the work folder as its base, not our working directory.
    args.detector, args.embedder = Path(args.detector).resolve(), Path(args.embedder).resolve()
    args.landmarks = Path(args.landmarks).resolve()
    for model in (args.detector, args.embedder):
        if not model.is_file():
            raise FileNotFoundError(f"model not found: {model}")
    images = Path(args.images or default_images_dir())
    workdir = Path(args.workdir or runs_dir() / "oneshot").resolve()
    workdir.mkdir(parents=True, exist_ok=True)

    people_photos = list_people(images)
    unknown_names, candidates = draw_people(people_photos, load_split(images)["val_people"],
                                            sizes["enrolled"], sizes["unknown"], args.seed)
    gallery = workdir / "gallery.db"
    for stale in workdir.glob("gallery.db*"):
        stale.unlink()
    detector, embedder = load_models(args.detector, args.embedder, args.landmarks)
    enrolled, refused = enroll_people(gallery, candidates, sizes["enrolled"], images,
                                      people_photos, sizes["per_person"], detector, embedder)
    del detector, embedder
    people = enrolled + unknown_people(unknown_names, images, people_photos, sizes["per_person"])
    appearances, frames = plan_appearances(people, args.seed)
    video = workdir / "oneshot.mp4"
    write_video(video, appearances, frames, args.seed)
    (workdir / "ground_truth.json").write_text(json.dumps(
        {"fps": FPS, "canvas": CANVAS, "frames": frames, "face_box": FACE_BOX,
         "people": [dataclasses.asdict(p) for p in people],
         "appearances": [dataclasses.asdict(a) for a in appearances]}, indent=1) + "\n")
    print(f"enrolled {len(enrolled)} people ({refused} photos refused on the way), "
          f"{len(unknown_names)} unknown; video {video}: {frames} frames, "
          f"{len(appearances)} appearances", flush=True)

    models_extra = {} if args.detector_imgsz is None else {"detector_imgsz": args.detector_imgsz}
    config = file_config(video, "oneshot", args.detector, args.embedder, gallery,
                         workdir / "events.jsonl", realtime=args.realtime,
                         models_extra=models_extra, landmarks=args.landmarks)
    if args.threshold is not None:
        config["match"] = {"threshold": args.threshold}
    started = time.monotonic()
    code = run_daemon(config, workdir / "config.yaml", args.timeout,
                      log_path=workdir / "daemon.log")
    wall = time.monotonic() - started
    events = read_events(workdir / "events.jsonl")
    result = {"enrolled": len(enrolled), "unknown": len(unknown_names),
              **score(appearances, events),
              "threshold": events[0]["threshold"] if events else args.threshold,
              "enroll_photos_refused": refused, "video_s": round(frames / FPS, 1),
              "realtime": args.realtime, "detector_imgsz": args.detector_imgsz, "seed": args.seed,
              "daemon_exit": code, "daemon_wall_s": round(wall, 1),
              "detector": str(args.detector), "detector_sha256": file_sha256(args.detector),
              "embedder": str(args.embedder), "embedder_sha256": file_sha256(args.embedder),
              "landmarks": str(args.landmarks) if args.landmarks.is_file() else None}
    line = json.dumps(result)
    (workdir / "result.json").write_text(line + "\n")
    print(line, flush=True)
    if code != 0:
        tail = (workdir / "daemon.log").read_text(errors="replace").splitlines()[-15:]
        log.error("the daemon exited %s (expected 0 at the end of the file); its log ends:\n%s",
                  code, "\n".join(tail))
        return 1
    return 0
