"""Enrollment: photos of one person -> checked face crops -> embeddings -> one gallery transaction.

Every photo is checked (readable, sane size, exactly one face, big and sharp enough) before
anything is written, so a bad photo leaves the gallery untouched. The crop is `crop_faces`, the
one the daemon and the embedder's training use.
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

from stages.detections import Detections
from stages.face_crop import CropSpec, crop_faces
from stages.gallery import Gallery, check_name

log = logging.getLogger("facewatch.enroll")

MAX_FILE_BYTES = 100 * 2**20    # a photo larger than this is not an enrollment photo
MAX_IMAGE_PIXELS = 40_000_000   # refused from the header, before decoding allocates it
MIN_IMAGE_SIDE = 32             # smaller cannot hold a face of MIN_FACE_HEIGHT_PX
MIN_FACE_HEIGHT_PX = 40         # face box height in the photo; smaller faces embed poorly
# Variance of the Laplacian of the grey embedder crop. Measured on 300 LFW faces cropped to
# 112 px: sharp photos 58 (1st percentile) to 207 (median); Gaussian blur of sigma ~2.4 crop px
# gives a median of 18; a 40 px face upscaled gives 28 (1st percentile).
MIN_SHARPNESS = 25.0


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


def face_sample(path: Path, frame: np.ndarray, detections: Detections, embedder: Embedder) -> FaceSample:
    """The one face of a photo, cropped for the embedder, or an error saying what is wrong."""
    if len(detections) == 0:
        raise EnrollmentError(f"no face found in {path}")
    if len(detections) > 1:
        scores = ", ".join(f"{s:.2f}" for s in sorted(detections.scores, reverse=True))
        raise EnrollmentError(f"{len(detections)} faces found in {path}, expected exactly one "
                              f"(scores {scores}); crop the photo to one person")
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
            embedder: Embedder) -> tuple[list[FaceSample], np.ndarray]:
    """Check every photo and embed the faces; raise one error listing every refused photo."""
    if not image_paths:
        raise EnrollmentError("no images given")
    samples: list[FaceSample] = []
    problems: list[str] = []
    for raw in image_paths:  # one photo in memory at a time: photos may be 40 MP each
        path = Path(raw)
        try:
            frame = load_image(path)
            samples.append(face_sample(path, frame, detector.detect([frame])[0], embedder))
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
