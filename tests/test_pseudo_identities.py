"""Pseudo-identities from unlabelled faces (`training.pseudo_identities`): real LFW photos, shuffled
into one unlabelled folder with a copied photo among them, grouped back by SFace's vectors."""
from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest

from facewatch.training.lfw import default_images_dir
from facewatch.training.pseudo_identities import (Calibration, folder_rate, group, leave_out_lfw,
                                                  load_faces, write_links)

LFW = default_images_dir()
pytestmark = pytest.mark.skipif(not LFW.is_dir(), reason=f"LFW images not found at {LFW} "
                                "(set FACEWATCH_DATA to the shared data folder)")


def _needs_sface():
    from facewatch.training.wheel_models import SFACE, YUNET, wheel_model_path

    try:
        wheel_model_path(SFACE), wheel_model_path(YUNET)
    except FileNotFoundError as exc:
        pytest.skip(f"SFace/YuNet not installed: {exc}")


@pytest.fixture(scope="module")
def unlabelled(tmp_path_factory, runs):
    """4 LFW people with 4 photos each and 10 people with one, under random names in one
    folder (what CelebA's and UTKFace's folders look like), one photo copied twice."""
    _needs_sface()
    people = sorted(p for p in LFW.iterdir() if p.is_dir())
    repeated = [p for p in people if len(list(p.glob("*.jpg"))) >= 4 and p.name.startswith("Y")][:4]
    single = [p for p in people if p.name.startswith(("W", "X"))][:10]
    assert len(repeated) == 4 and len(single) == 10
    photos = [(p.name, f) for p in repeated for f in sorted(p.glob("*.jpg"))[:4]]
    photos += [(p.name, sorted(p.glob("*.jpg"))[0]) for p in single]
    photos.append(photos[0])                       # the same photo twice, as UTKFace has
    random.Random(0).shuffle(photos)
    folder = tmp_path_factory.mktemp("unlabelled") / "faces"
    folder.mkdir()
    truth = {}
    for n, (person, src) in enumerate(photos):
        shutil.copy(src, folder / f"{n:04d}.jpg")
        truth[f"{n:04d}.jpg"] = person
    return folder, truth, [p.name for p in repeated]


def test_groups_are_one_person_each_and_copies_count_once(unlabelled):
    folder, truth, repeated = unlabelled
    probe = load_faces([folder], centre=np.zeros(128, np.float32))
    faces = load_faces([folder], centre=probe.vectors.mean(axis=0))
    people, counts = group(faces.vectors, threshold=0.45)
    assert counts["near_duplicates_dropped"] == 1
    found = [sorted(truth[str(p)] for p in faces.paths[rows]) for rows in people]
    for names in found:
        assert len(set(names)) == 1, f"a group mixes people: {names}"
        assert len(names) <= 4, f"the copied photo counted twice: {names}"
    assert len(found) >= 3, f"only {len(found)} of the 4 repeated people found: {found}"
    assert {n[0] for n in found} <= set(repeated)

    # a group as close to an LFW person as the guard's threshold is left out
    lfw_vectors = faces.vectors[people[0]]
    lfw_people = np.array(["someone"] * len(lfw_vectors))
    kept, left = leave_out_lfw(people, faces.vectors, lfw_vectors, lfw_people, threshold=0.42)
    assert len(kept) == len(people) - 1 and left[0]["lfw"] == "someone"

    # the layout `train-embedder --labelled-folder` reads: OUT/<group>/<photo link>
    out = folder.parent / "pseudo"
    write_links(out, kept, faces)
    groups = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(groups) == len(kept)
    from facewatch.training.labelled_folders import read_keep_list
    assert read_keep_list(out / "keep.txt") == [g.name for g in groups]
    for g in groups:
        links = list(g.iterdir())
        assert all(p.is_symlink() and p.resolve().parent == folder.resolve() for p in links)
        assert len({truth[p.resolve().name] for p in links}) == 1


def test_threshold_follows_the_rate_and_larger_folders_get_stricter():
    impostor = np.linspace(0.9, 0.3, 1000)          # highest first
    calib = Calibration(impostor, np.array([0.8, 0.5, 0.35]), different_pairs=10**6,
                        same_pairs=3, faces=1000)
    assert calib.threshold(1e-6) == pytest.approx(impostor[1], abs=1e-5)
    assert calib.threshold(1e-5) < calib.threshold(1e-6)
    report = calib.report(5e-4)            # threshold ~0.60
    assert report["same_pairs_found"] == pytest.approx(1 / 3, abs=1e-3)
    assert json.dumps(report)
    assert folder_rate(1e-6, 1000, 500) == 1e-6       # never looser than asked
    assert folder_rate(1e-6, 1000, 2000) == pytest.approx(2.5e-7)


def test_validation_guard_leaves_out_photos_of_validation_people_only(unlabelled):
    """A photo of a validation person (another photo of them than the mean was made from) is
    near their mean; photos of the other people are not."""
    from facewatch.training.validation_guard import near_people, person_means

    folder, truth, repeated = unlabelled
    probe = load_faces([folder], centre=np.zeros(128, np.float32))
    faces = load_faces([folder], centre=probe.vectors.mean(axis=0))
    people = np.array([truth[str(p)] for p in faces.paths])
    val = repeated[0]
    first = np.flatnonzero(people == val)[:2]            # the "validation" photos
    _, means = person_means(faces.vectors[first], people[first])
    near = near_people(faces.vectors, means)
    others = np.setdiff1d(np.flatnonzero(people == val), first)
    assert near[first].all() and near[others].any()
    assert not near[people != val].any()


def test_out_folder_not_written_by_the_tool_is_refused_and_kept(tmp_path):
    """--out pointing at a folder of someone's data must never delete it."""
    data = tmp_path / "extra"
    (data / "celeba").mkdir(parents=True)
    (data / "celeba" / "0001.jpg").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="not written by pseudo_identities"):
        write_links(data, [], faces=None)   # refused before any face is needed
    assert (data / "celeba" / "0001.jpg").read_bytes() == b"x"
