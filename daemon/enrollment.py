"""Enrollment: photos of one person -> checked face crops -> embeddings -> one gallery transaction.

Every photo is checked (readable, sane size, one face to take, big and sharp enough) before
anything is written, so a bad photo leaves the gallery untouched. The crop is `crop_faces`, the
one the daemon and the embedder's training use.

Which face: the only one, or the dominant one, clearly the largest (at least DOMINANT_AREA_RATIO
times the area of the next); otherwise the photo is refused with the faces listed (largest
first) so the operator can choose one with `--face N` or crop the photo. A box scoring under
COMPETING_SCORE_RATIO of the best score does not compete: an enrollment photo is a deliberate
portrait, and such boxes are the detector's doubtful ones (a 0.47 box on the painting behind a
0.91 face refused a shared enrollment photo). A face that fills the
photo is too large for the detector's training distribution: when the photo itself shows no
face, it is detected again shrunk into a larger canvas (PAD_CANVASES), as if it had been taken
from further away.
"""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from facewatch.stages.detections import Detections
from facewatch.stages.face_crop import CropSpec, crop_faces
from facewatch.stages.gallery import Gallery, check_name

log = logging.getLogger("facewatch.enroll")

MAX_FILE_BYTES = 100 * 2**20    # a photo larger than this is not an enrollment photo
MAX_IMAGE_PIXELS = 40_000_000   # refused from the header, before decoding allocates it
MIN_IMAGE_SIDE = 32             # smaller cannot hold a face of MIN_FACE_HEIGHT_PX
MIN_FACE_HEIGHT_PX = 40         # face box height in the photo; smaller faces embed poorly
# Variance of the Laplacian of the grey embedder crop. Measured on 300 LFW faces cropped to
# 112 px: sharp photos 58 (1st percentile) to 207 (median); Gaussian blur of sigma ~2.4 crop px
# gives a median of 18; a 40 px face upscaled gives 28 (1st percentile).
MIN_SHARPNESS = 25.0
DOMINANT_AREA_RATIO = 2.0       # the largest face is taken when at least this x the next one's area
COMPETING_SCORE_RATIO = 0.6     # boxes under this x the best score do not make a photo ambiguous
# Canvas sizes (x the photo's longer side) the photo is centred in when it shows no face as it
# is: a face filling a portrait photo is found once it fills about half the detector's input.
PAD_CANVASES = (2.0, 3.0)
PAD_VALUE = 114                 # the detector's letterbox grey


class EnrollmentError(ValueError):
    """A photo or request that cannot be enrolled; the message names the file and the reason."""


class Detector(Protocol):
    def detect(self, frames: list[np.ndarray]) -> list[Detections]: ...


class Embedder(Protocol):
    input_size: int
    crop_spec: CropSpec

    def embed(self, crops: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class FaceSample:
    source: Path
    box: np.ndarray     # (4,) x1 y1 x2 y2 in the photo
    score: float        # detector confidence
    sharpness: float    # Laplacian variance of the crop
    crop: np.ndarray    # (S, S, 3) uint8 BGR, the embedder's input


@dataclass(frozen=True)
class EnrollResult:
    person_id: int
    name: str
    model_id: str
    samples: list[FaceSample]
    embeddings: np.ndarray  # (K, D) float32, as stored


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Decode a photo as HxWx3 uint8 BGR (EXIF rotation applied), refusing absurd sizes first."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise EnrollmentError(f"image file too large: {path} is {size / 2**20:.0f} MiB, the limit "
                              f"is {MAX_FILE_BYTES / 2**20:.0f} MiB")
    try:  # Pillow reads only the header here: the pixel count is known before any decoding
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as header:
                width, height, fmt = header.width, header.height, header.format
    except Image.DecompressionBombError:
        raise EnrollmentError(f"image too large: {path} has more than "
                              f"{2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} megapixels, the limit is "
                              f"{MAX_IMAGE_PIXELS / 1e6:.0f}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise EnrollmentError(f"not an image: {path} ({type(exc).__name__}: {exc})") from None
    except Exception as exc:  # noqa: BLE001  a plugin that fails on odd bytes (ultralytics
        # registers a HEIF opener that needs pi_heif): the file is still not an image we read
        raise EnrollmentError(f"not an image: {path} ({type(exc).__name__}: {exc})") from None
    if width * height > MAX_IMAGE_PIXELS:
        raise EnrollmentError(f"image too large: {path} is {width}x{height} pixels "
                              f"({width * height / 1e6:.0f} megapixels), the limit is "
                              f"{MAX_IMAGE_PIXELS / 1e6:.0f}")
    if min(width, height) < MIN_IMAGE_SIDE:
        raise EnrollmentError(f"image too small: {path} is {width}x{height} pixels, at least "
                              f"{MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} needed")
    frame = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if frame is None:
        raise EnrollmentError(f"cannot decode image: {path} ({fmt} file, damaged or a format "
                              f"OpenCV does not read)")
    return frame


def sharpness(crop: np.ndarray) -> float:
    grey = cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY)
    return float(cv2.Laplacian(grey, cv2.CV_64F).var())


def detect_faces(detector: Detector, frame: np.ndarray) -> Detections:
    """The photo's faces; when it shows none as it is, the photo is centred in larger grey
    canvases in turn (a face filling the photo is then the size the detector knows) and the
    boxes are mapped back onto the photo."""
    found = detector.detect([frame])[0]
    h, w = frame.shape[:2]
    for factor in PAD_CANVASES:
        if len(found):
            break
        side = int(round(max(h, w) * factor))
        top, left = (side - h) // 2, (side - w) // 2
        canvas = cv2.copyMakeBorder(frame, top, side - h - top, left, side - w - left,
                                    cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 3)
        d = detector.detect([canvas])[0]
        if len(d) == 0:
            continue
        shift = np.array([left, top], np.float32)
        boxes = d.boxes - np.tile(shift, 2)
        boxes = np.clip(boxes, 0, np.array([w, h, w, h], np.float32)).astype(np.float32)
        landmarks = None if d.landmarks is None else (d.landmarks - shift).astype(np.float32)
        found = Detections(boxes, d.scores, landmarks)
        log.debug("face found with the photo in a %dx canvas", factor)
    return found


def _area(boxes: np.ndarray) -> np.ndarray:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def face_sample(path: Path, frame: np.ndarray, detections: Detections, embedder: Embedder,
                face: int | None = None) -> FaceSample:
    """The photo's face to enroll (the only one, the dominant one, or `face` N counted from the
    largest), cropped for the embedder, or an error saying what is wrong and how to choose."""
    if len(detections) == 0:
        raise EnrollmentError(f"no face found in {path}")
    order = np.argsort(-_area(detections.boxes), kind="stable")
    competing = [int(i) for i in order
                 if detections.scores[i] >= COMPETING_SCORE_RATIO * float(detections.scores.max())]
    areas = _area(detections.boxes)[competing]
    if face is not None:
        if not 1 <= face <= len(order):
            raise EnrollmentError(f"--face {face}: {path} has {len(order)} face"
                                  f"{'s' if len(order) != 1 else ''} (1 = the largest)")
        pick = int(order[face - 1])
    elif len(competing) == 1 or areas[0] >= DOMINANT_AREA_RATIO * areas[1]:
        pick = competing[0]
    else:
        listed = "; ".join(
            f"{n}: [{', '.join(str(int(round(v))) for v in detections.boxes[i])}] "
            f"{int(round(detections.boxes[i][2] - detections.boxes[i][0]))}x"
            f"{int(round(detections.boxes[i][3] - detections.boxes[i][1]))} px, "
            f"score {detections.scores[i]:.2f}" for n, i in enumerate(order, 1))
        raise EnrollmentError(
            f"{len(order)} faces found in {path} and none is clearly the largest (at least "
            f"{DOMINANT_AREA_RATIO:g}x the area of the next): {listed}; choose one with "
            f"--face N (1 = the largest) or crop the photo to one person")
    detections = Detections(detections.boxes[pick:pick + 1], detections.scores[pick:pick + 1],
                            None if detections.landmarks is None
                            else detections.landmarks[pick:pick + 1])
    box = detections.boxes[0]
    height = float(box[3] - box[1])
    if height < MIN_FACE_HEIGHT_PX:
        raise EnrollmentError(f"face too small in {path}: {height:.0f} px tall, at least "
                              f"{MIN_FACE_HEIGHT_PX} px needed; use a closer or larger photo")
    crop = crop_faces(frame, box[None], embedder.crop_spec,
                      None if detections.landmarks is None else detections.landmarks[:1])[0][0]
    sharp = sharpness(crop)
    if sharp < MIN_SHARPNESS:
        raise EnrollmentError(f"face too blurry in {path}: sharpness {sharp:.1f}, at least "
                              f"{MIN_SHARPNESS:.0f} needed")
    return FaceSample(path, box.copy(), float(detections.scores[0]), sharp, crop)


def prepare(image_paths: Sequence[str | os.PathLike], detector: Detector,
            embedder: Embedder, face: int | None = None) -> tuple[list[FaceSample], np.ndarray]:
    """Check every photo and embed the faces; raise one error listing every refused photo.
    `face`: take face N (1 = the largest) of every photo instead of the dominant one."""
    if not image_paths:
        raise EnrollmentError("no images given")
    samples: list[FaceSample] = []
    problems: list[str] = []
    for raw in image_paths:  # one photo in memory at a time: photos may be 40 MP each
        path = Path(raw)
        try:
            frame = load_image(path)
            samples.append(face_sample(path, frame, detect_faces(detector, frame), embedder, face))
        except (EnrollmentError, FileNotFoundError) as exc:
            problems.append(str(exc))
    if problems:
        prefix = f"{len(problems)} of {len(image_paths)} images refused, nothing enrolled: " \
            if len(image_paths) > 1 else ""
        raise EnrollmentError(prefix + "; ".join(problems))
    embeddings = embedder.embed(np.stack([s.crop for s in samples]))
    return samples, np.asarray(embeddings, np.float32)


def store(gallery: Gallery, name: str, samples: list[FaceSample], embeddings: np.ndarray,
          model_id: str) -> EnrollResult:
    """Write prepared samples in one transaction."""
    # quality = the crop's sharpness, kept so weak samples can be found and replaced later
    person_id = gallery.enroll(name, embeddings, model_id, [s.source.name for s in samples],
                               [s.sharpness for s in samples])
    log.info("enrolled %s (person %d): %d embeddings", name, person_id, len(samples))
    return EnrollResult(person_id, check_name(name), model_id, samples, embeddings)


def enroll_images(gallery: Gallery, name: str, image_paths: Sequence[str | os.PathLike],
                  detector: Detector, embedder: Embedder, model_id: str | None = None) -> EnrollResult:
    """Enroll `name` from photos, all or nothing. `model_id` defaults to `embedder.model_id`."""
    check_name(name)  # before the slow part
    model_id = model_id or getattr(embedder, "model_id", None)
    if not model_id:
        raise EnrollmentError("model_id unknown: pass model_id=file_model_id(embedder_path)")
    samples, embeddings = prepare(image_paths, detector, embedder)
    return store(gallery, name, samples, embeddings, model_id)
