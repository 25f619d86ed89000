"""Extra identities from folders of face photos (`train-embedder --labelled-folder`) and the CFP
identity guard that keeps LFW people out of them: real LFW photos, real short training runs."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from facewatch.training.cfp_identities import (CFP_KEEP_FILE, CFP_NAMES_FILE, LFW_NAMES_FILE,
                                               name_match, normalise_name, read_names)
from facewatch.training.labelled_folders import read_keep_list
from facewatch.training.lfw import default_images_dir, load_split

LFW = default_images_dir()
needs_lfw = pytest.mark.skipif(not LFW.is_dir(), reason=f"LFW images not found at {LFW} "
                               "(set FACEWATCH_DATA to the shared data folder)")


# ---------------------------------------------------------------------------- the CFP guard
def test_names_match_across_spelling_case_accents_and_order():
    lfw = ["Jennifer_Aniston", "Robert_De_Niro", "Kevin_Costner", "Zhang_Ziyi", "Beyonce_Knowles",
           "Luiz_Inacio_Lula_da_Silva", "Gerhard_Schroeder", "Martin_Scorsese"]
    assert normalise_name("Amar'e_Stoudemire") == normalise_name("AMARE Stoudemíre") == "amare stoudemire"
    for cfp, expected in [("Jennifer Anniston", "Jennifer_Aniston"), ("Robert Do Niro", "Robert_De_Niro"),
                          ("Jevin Kostner", "Kevin_Costner"), ("Ziyi Zhang", "Zhang_Ziyi"),
                          ("Beyonce", "Beyonce_Knowles"), ("Luiz Lula Da Silva", "Luiz_Inacio_Lula_da_Silva"),
                          ("Gerard Schroeder", "Gerhard_Schroeder")]:
        match = name_match(cfp, lfw)
        assert match is not None and match[0] == expected, (cfp, match)
    assert name_match("Lionel Messi", lfw) is None


def test_committed_cfp_keep_list_has_no_lfw_name_and_no_validation_person():
    kept = read_keep_list(CFP_KEEP_FILE)
    names = read_names(CFP_NAMES_FILE)
    assert len(names) == 500 and len(kept) == len(set(kept)) > 200
    lfw_norm = {normalise_name(n) for n in read_names(LFW_NAMES_FILE)}
    for folder in kept:
        assert normalise_name(names[int(folder) - 1]) not in lfw_norm, folder
    if LFW.is_dir():   # every LFW validation person is in the name list the guard used
        assert set(load_split(LFW)["val_people"]) <= set(read_names(LFW_NAMES_FILE))


# ---------------------------------------------------------------------------- training
def _needs_sface():
    from facewatch.training.wheel_models import SFACE, YUNET, wheel_model_path

    try:
        wheel_model_path(SFACE), wheel_model_path(YUNET)
    except FileNotFoundError as exc:
        pytest.skip(f"SFace/YuNet not installed: {exc}")


def _labelled_folder(root):
    """Two identities of real LFW photos: <root>/<name>/<photo>, the second one nested deeper."""
    people = [p for p in sorted(LFW.glob("Z*")) if len(list(p.glob("*.jpg"))) >= 3][:2]
    for n, person in enumerate(people):
        target = root / person.name / ("frontal" if n else "")
        target.mkdir(parents=True)
        for src in sorted(person.glob("*.jpg"))[:3]:
            shutil.copy(src, target / src.name)
    return [p.name for p in people]


SFACE_RUN = ("--loss", "arcface", "--embedding-size", "128", "--teacher", "sface",
             "--alignment", "arcface_five_point", "--landmarks", "yunet")


@needs_lfw
def test_labelled_folder_adds_classes_resumes_and_initialises_a_new_run(runs, tmp_path, capsys):
    from test_embedder_training import train

    _needs_sface()
    folder = tmp_path / "labelled"
    names = _labelled_folder(folder)
    ckpt = tmp_path / "ckpt"
    run_dir = train(*SFACE_RUN, "--out", "run-labelled", "--labelled-folder", str(folder),
                    "--checkpoint-dir", str(ckpt))
    summary = json.loads((run_dir / "summary.json").read_text())
    labelled = summary["data"]["labelled"]
    assert summary["data"]["train_people"] == 12
    assert labelled["identities"] == 2 and labelled["faces"] == 6
    assert labelled["folders"][str(folder)]["identities_left_out_by_keep_list"] == 0
    with np.load(ckpt / "weights.npz") as saved:   # ArcFace: 12 LFW classes + 2 new ones
        assert saved["arcface/centres"].shape == (128, 14)
    assert np.isfinite(summary["history"][0]["loss"])

    # --resume restores the folder from the run (the command no longer names it)
    run_dir = train(*SFACE_RUN, "--out", "run-labelled", "--resume", "--epochs", "2")
    state = json.loads((run_dir / "state.json").read_text())
    assert state["epoch"] == 2 and state["args"]["labelled_folder"] == [str(folder)]

    # a new run from the committed weights: the 12 shared classes' centres carry over
    keep = tmp_path / "keep.txt"
    keep.write_text(f"# one identity only\n{names[1]}\tsecond person\n")
    run_dir = train(*SFACE_RUN, "--out", "run-init", "--init-from", str(ckpt),
                    "--labelled-folder", str(folder), "--labelled-keep", str(keep))
    assert "ArcFace centres of the first 12 classes (LFW's)" in capsys.readouterr().out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["data"]["labelled"]["identities"] == 1
    assert summary["data"]["labelled"]["folders"][str(folder)]["identities_left_out_by_keep_list"] == 1


@needs_lfw
def test_unknown_empty_or_flat_labelled_folders_are_refused_naming_them(runs, tmp_path):
    from test_embedder_training import train

    from facewatch.stages.face_crop import CropSpec
    from facewatch.training.labelled_folders import load_labelled_folders

    _needs_sface()
    missing = tmp_path / "no-such-folder"
    with pytest.raises(FileNotFoundError, match="no-such-folder"):
        train(*SFACE_RUN, "--out", "refused", "--labelled-folder", str(missing))
    empty = tmp_path / "empty"
    empty.mkdir()
    spec = CropSpec(size=96, alignment="arcface_five_point")
    with pytest.raises(FileNotFoundError, match="no face photos"):
        load_labelled_folders([empty], None, "sface", spec, first_label=0)
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(sorted(LFW.glob("Z*/*.jpg"))[0], flat / "a.jpg")
    with pytest.raises(ValueError, match="not in an identity subfolder"):
        load_labelled_folders([flat], None, "sface", spec, first_label=0)
    folder = tmp_path / "labelled"
    _labelled_folder(folder)
    keep = tmp_path / "keep.txt"
    keep.write_text("Nobody_Here\n")
    with pytest.raises(ValueError, match="Nobody_Here"):
        load_labelled_folders([folder], [keep], "sface", spec, first_label=0)
    with pytest.raises(ValueError, match="one keep list per folder"):
        load_labelled_folders([folder, folder], [keep], "sface", spec, first_label=0)
