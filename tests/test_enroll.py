"""Enrollment: photo checks, the one-face and quality gates, the real models, `facewatch enroll`."""
from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from facewatch.daemon.enrollment import (COMPETING_SCORE_RATIO, MAX_IMAGE_PIXELS, MIN_SHARPNESS, EnrollmentError, detect_faces,
                               enroll_images, face_sample, load_image, prepare, sharpness)
from facewatch.stages.detections import Detections
from facewatch.stages.face_crop import DEFAULT_CROP_SIZE
from facewatch.stages.face_crop import CropSpec as FaceCropSpec
from facewatch.stages.gallery import Gallery, file_model_id

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("FACEWATCH_DATA", ROOT.parent / "shared" / "data"))
KNN = DATA / "faces_small" / "knn_examples"
LFW = DATA / "lfw" / "lfw-deepfunneled"
DETECTOR = ROOT / "models" / "face_detector.onnx"
EMBEDDER = ROOT / "models" / "face_embedder.onnx"

needs_knn = pytest.mark.skipif(not KNN.is_dir(), reason=f"enrollment photos not found at {KNN}")
needs_lfw = pytest.mark.skipif(not LFW.is_dir(), reason=f"LFW not found at {LFW}")
needs_models = pytest.mark.skipif(
    not (DETECTOR.is_file() and EMBEDDER.is_file()),
    reason="models/face_detector.onnx and models/face_embedder.onnx not built yet "
           "(facewatch train-detector/export-detector, train-embedder/export-embedder)")


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with almost no pixel data behind it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def jpeg_claiming(width: int, height: int) -> bytes:
    """A real small JPEG whose SOF0 segment is patched to claim width x height."""
    data = bytearray(cv2.imencode(".jpg", np.full((64, 64, 3), 128, np.uint8))[1].tobytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


class CropSpec:
    """What face_sample needs from an embedder: the crop geometry (the default crop)."""
    input_size = DEFAULT_CROP_SIZE
    crop_spec = FaceCropSpec()


# --- photo checks (no model needed) ---------------------------------------------------------

@pytest.mark.parametrize("make, message", [
    (lambda p: write(p / "photo.jpg", b"this is not a photo\n"), "not an image: {path}"),
    (lambda p: write(p / "empty.jpg", b""), "not an image: {path}"),
    (lambda p: p / "tiny.png" if cv2.imwrite(str(p / "tiny.png"), np.zeros((1, 1, 3), np.uint8))
     else None, "image too small: {path} is 1x1 pixels"),
    (lambda p: write(p / "bomb.png", png_header(20000, 20000)), "image too large: {path}"),
    (lambda p: write(p / "bomb.jpg", jpeg_claiming(20000, 20000)), "image too large: {path}"),
    (lambda p: write(p / "big.png", png_header(10000, 5000)),
     "image too large: {path} is 10000x5000 pixels"),
    (lambda p: write(p / "cut.png", cv2.imencode(".png", np.random.default_rng(0).integers(
        0, 255, (200, 200, 3), np.uint8))[1].tobytes()[:3000]), "cannot decode image: {path}"),
])
def test_bad_photos_are_refused_by_name(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(EnrollmentError) as err:
        load_image(path)
    assert message.format(path=path) in str(err.value)


def test_missing_photo(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"image not found: {tmp_path / 'x.jpg'}"):
        load_image(tmp_path / "x.jpg")


@pytest.mark.parametrize("kind", ["png", "jpg"])
def test_huge_header_is_refused_without_allocating(tmp_path, kind):
    """20000 x 20000 x 3 would be 1.2 GB: the peak memory of the refusing process proves it was not."""
    path = write(tmp_path / f"bomb.{kind}",
                 png_header(20000, 20000) if kind == "png" else jpeg_claiming(20000, 20000))
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the (large) pytest parent across
    # fork+exec, while VmHWM belongs to the child's own address space.
    script = ("import re, sys\nfrom daemon.enrollment import load_image, EnrollmentError\n"
              "try:\n    load_image(sys.argv[1])\nexcept EnrollmentError as e:\n    print(e)\n"
              "print(int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1]) // 1024)")
    out = subprocess.run([sys.executable, "-c", script, str(path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=True).stdout.splitlines()
    assert out[0].startswith(f"image too large: {path}")
    assert int(out[1]) < 600, f"peak RSS {out[1]} MiB: the image was decoded"
    assert MAX_IMAGE_PIXELS < 20000 * 20000


def test_grey_photo_decodes_as_bgr(tmp_path):
    grey = cv2.imwrite(str(tmp_path / "g.png"), np.full((50, 60), 200, np.uint8))
    assert grey and load_image(tmp_path / "g.png").shape == (50, 60, 3)  # grey becomes BGR


# --- the one-face and quality gates (real crops, detections given) -----------------------

def lfw_photo() -> tuple[np.ndarray, np.ndarray]:
    """An LFW deep-funneled photo and its face box (the faces are centred there)."""
    path = sorted(LFW.glob("*/*.jpg"))[0]
    return load_image(path), np.array([75, 70, 175, 185], np.float32)


@needs_lfw
def test_one_sharp_face_passes():
    frame, box = lfw_photo()
    sample = face_sample(Path("a.jpg"), frame, Detections(box[None], np.array([0.9], np.float32)), CropSpec())
    assert sample.crop.shape == (DEFAULT_CROP_SIZE, DEFAULT_CROP_SIZE, 3)
    assert sample.sharpness >= MIN_SHARPNESS and sample.score == pytest.approx(0.9)


@needs_lfw
def test_face_gates():
    frame, box = lfw_photo()
    spec, path = CropSpec(), Path("p.jpg")
    with pytest.raises(EnrollmentError, match="no face found in p.jpg"):
        face_sample(path, frame, Detections.empty(), spec)
    two = Detections(np.stack([box, box + 5]), np.array([0.9, 0.6], np.float32))
    with pytest.raises(EnrollmentError, match="2 faces found in p.jpg and none is clearly the largest"):
        face_sample(path, frame, two, spec)
    small = Detections(np.array([[10, 10, 40, 40]], np.float32), np.array([0.9], np.float32))
    with pytest.raises(EnrollmentError, match="face too small in p.jpg: 30 px tall"):
        face_sample(path, frame, small, spec)
    blurred = cv2.GaussianBlur(frame, (0, 0), 3.0)
    with pytest.raises(EnrollmentError, match="face too blurry in p.jpg"):
        face_sample(path, blurred, Detections(box[None], np.array([0.9], np.float32)), spec)
    assert sharpness(np.zeros((112, 112, 3), np.uint8)) == 0.0


@needs_lfw
def test_the_dominant_face_is_taken_and_ambiguity_names_the_faces():
    """Issue 13, item 9: a background face half the subject's area no longer refuses the photo;
    two faces of similar size are refused with each face listed and how to choose."""
    frame, box = lfw_photo()   # the subject: 100 x 115 px
    small = np.array([5, 5, 75, 87], np.float32)   # 70 x 82 px: just under half its area
    both = Detections(np.stack([small, box]), np.array([0.95, 0.8], np.float32))
    sample = face_sample(Path("p.jpg"), frame, both, CropSpec())
    assert sample.box.tolist() == box.tolist() and sample.score == pytest.approx(0.8)
    similar = np.array([85, 80, 165, 160], np.float32)   # 80 x 80 px: more than half its area
    three = Detections(np.stack([similar, box, small]), np.array([0.9, 0.8, 0.7], np.float32))
    with pytest.raises(EnrollmentError) as err:
        face_sample(Path("p.jpg"), frame, three, CropSpec())
    text = str(err.value)
    assert "3 faces found in p.jpg and none is clearly the largest" in text
    assert "1: [75, 70, 175, 185] 100x115 px, score 0.80; 2: [85, 80, 165, 160] 80x80 px" in text
    assert "--face N (1 = the largest) or crop the photo" in text
    second = face_sample(Path("p.jpg"), frame, three, CropSpec(), face=2)
    assert second.box.tolist() == similar.tolist()
    with pytest.raises(EnrollmentError, match="--face 4: p.jpg has 3 faces"):
        face_sample(Path("p.jpg"), frame, three, CropSpec(), face=4)


# --- with the real models ------------------------------------------------------------------

@pytest.fixture(scope="module")
def models():
    from facewatch.stages.face_detector import FaceDetector
    from facewatch.stages.face_embedder import FaceEmbedder
    from facewatch.stages.face_landmarks import landmarks_to_run
    cpu = ("CPUExecutionProvider",)
    embedder = FaceEmbedder(EMBEDDER, providers=cpu)
    landmarks = landmarks_to_run(embedder.crop_spec.alignment, DETECTOR.parent / "face_landmarks.onnx")
    return FaceDetector(DETECTOR, providers=cpu, landmarks=landmarks), embedder, file_model_id(EMBEDDER)


def two_faces(tmp_path: Path) -> Path:
    """Two faces of the same size: neither is dominant."""
    a = cv2.imread(str(KNN / "train" / "obama" / "obama.jpg"))
    h = 600
    a = cv2.resize(a, (round(a.shape[1] * h / a.shape[0]), h))
    b = cv2.flip(a, 1)
    path = tmp_path / "two.jpg"
    cv2.imwrite(str(path), np.hstack([a, b]))
    return path


def noise(tmp_path: Path) -> Path:
    path = tmp_path / "noise.png"
    cv2.imwrite(str(path), np.random.default_rng(0).integers(0, 256, (480, 640, 3), np.uint8))
    return path


@needs_models
@needs_knn
def test_enroll_and_recognize(tmp_path, models):
    detector, embedder, model_id = models
    enrolled = 0
    with Gallery(tmp_path / "g.db") as g:
        for name in ("obama", "biden", "rose_leslie"):
            photos = sorted((KNN / "train" / name).glob("*"))
            result = enroll_images(g, name, photos, detector, embedder, model_id)
            assert result.embeddings.shape == (len(photos), embedder.embedding_size)
            enrolled += len(photos)
        snap = g.snapshot()
        assert snap.model_id == model_id and len(snap) == enrolled == 6
    _, probe = prepare([KNN / "test" / "obama1.jpg"], detector, embedder)
    assert snap.names[int(np.argmax(snap.embeddings @ probe[0]))] == "obama"


@needs_models
@needs_lfw
def test_a_face_filling_the_photo_is_found(models):
    """Issue 13, item 9: portraits cropped to the face. A detector that learnt faces filling at
    most part of the picture misses them; enrollment finds every one, retrying with the photo
    shrunk into a larger canvas, with the box mapped back onto the photo."""
    detector, embedder, _ = models
    missed_alone, found = 0, 0
    photos = sorted(LFW.glob("*/*_0001.jpg"))[:400:20]
    for path in photos:
        image = load_image(path)
        x1, y1, x2, y2 = 78, 68, 172, 182   # deep-funneled LFW: the face is in the centre
        portrait = cv2.resize(image[y1:y2, x1:x2], (400, round(400 * (y2 - y1) / (x2 - x1))))
        missed_alone += len(detector.detect([portrait])[0]) == 0
        faces = detect_faces(detector, portrait)
        if len(faces):
            found += 1
            bx1, by1, bx2, by2 = faces.boxes[np.argmax(faces.scores)]
            assert 0 <= bx1 < bx2 <= 400 and 0 <= by1 < by2 <= portrait.shape[0]
            assert (bx2 - bx1) > 0.5 * 400, "the face fills the photo: so must its box"
    # The detector trained with teacher-labelled portraits (issue 11) finds most of these on
    # its own (the scratch one missed about half); the canvas retry must never lose one.
    assert found >= len(photos) - missed_alone
    assert found >= len(photos) - 1, (found, len(photos))


@needs_models
@needs_knn
def test_enroll_face_option_chooses_among_similar_faces(tmp_path, models):
    detector, embedder, model_id = models
    photo = two_faces(tmp_path)   # obama and biden side by side, similar sizes
    with pytest.raises(EnrollmentError, match=r"--face N \(1 = the largest\)"):
        prepare([photo], detector, embedder)
    (sample,), _ = prepare([photo], detector, embedder, face=2)
    assert sample.source == photo


@needs_models
@needs_knn
@pytest.mark.parametrize("make, message", [
    (noise, "no face found in {path}"),
    (two_faces, "2 faces found in {path} and none is clearly the largest"),
])
def test_bad_photo_enrolls_nothing(tmp_path, models, make, message):
    detector, embedder, model_id = models
    bad = make(tmp_path)
    with Gallery(tmp_path / "g.db") as g:
        enroll_images(g, "rose", [KNN / "train" / "rose_leslie" / "img1.jpg"], detector, embedder, model_id)
        before, snap = g.data_version(), g.snapshot()
        good = KNN / "train" / "obama" / "obama.jpg"
        with pytest.raises(EnrollmentError) as err:
            enroll_images(g, "obama", [good, bad], detector, embedder, model_id)
        assert message.format(path=bad) in str(err.value)
        assert "1 of 2 images refused, nothing enrolled" in str(err.value)
        assert g.data_version() == before and g.snapshot().names == snap.names


@needs_models
@needs_knn
def test_enroll_command(tmp_path):
    gallery = tmp_path / "new" / "g.db"
    bad = noise(tmp_path)
    r = subprocess.run([sys.executable, "-m", "facewatch.daemon.cli", "enroll", "--cpu", "--gallery", str(gallery),
                        "--name", "obama", str(bad)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and f"no face found in {bad}" in r.stderr
    assert not gallery.exists()  # a failed first enrollment creates nothing
    photos = [str(p) for p in sorted((KNN / "train" / "obama").glob("*"))]
    r = subprocess.run([sys.executable, "-m", "facewatch.daemon.cli", "enroll", "--cpu", "--gallery", str(gallery),
                        "--name", "obama", *photos], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"enrolled obama (person 1): {len(photos)} new embeddings" in r.stdout
    with Gallery(gallery, create=False) as g:
        assert [(p.name, p.n_embeddings) for p in g.persons()] == [("obama", len(photos))]


@needs_lfw
def test_a_doubtful_box_does_not_compete_with_a_confident_face():
    """A large box scoring under COMPETING_SCORE_RATIO of the best (the detector's 0.47 box on the
    painting behind biden2.jpg's 0.91 face) no longer refuses the photo; --face still counts it."""
    frame, box = lfw_photo()   # the subject: 100 x 115 px
    background = np.array([0, 0, 120, 150], np.float32)   # 1.6x the subject's area
    scores = np.array([0.47, 0.91], np.float32)
    assert scores[0] < COMPETING_SCORE_RATIO * scores[1]
    sample = face_sample(Path("p.jpg"), frame, Detections(np.stack([background, box]), scores), CropSpec())
    assert sample.box.tolist() == box.tolist() and sample.score == pytest.approx(0.91)
    close = np.array([0.7, 0.91], np.float32)   # a competitor: the photo stays ambiguous
    with pytest.raises(EnrollmentError, match="2 faces found in p.jpg and none is clearly the largest"):
        face_sample(Path("p.jpg"), frame, Detections(np.stack([background, box]), close), CropSpec())
    with pytest.raises(EnrollmentError, match="--face 3: p.jpg has 2 faces"):
        face_sample(Path("p.jpg"), frame, Detections(np.stack([background, box]), scores), CropSpec(), face=3)
