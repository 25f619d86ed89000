"""Embedder training: loss math against plain numpy, the fixed split, and real short runs on LFW."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from facewatch.training.embedder_losses import (ArcMarginHead, contrastive_loss, distillation_loss,
                                     triplet_loss)
from facewatch.training.lfw import SPLIT_FILE, VAL_PAIRS_FILE, default_images_dir, read_pairs

LFW = default_images_dir()
needs_lfw = pytest.mark.skipif(not LFW.is_dir(), reason=f"LFW images not found at {LFW} "
                               "(set FACEWATCH_DATA to the shared data folder)")


def unit(rng, n, d):
    e = rng.normal(size=(n, d)).astype(np.float32)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def distances(e):
    return np.sqrt(np.maximum(2 - 2 * e @ e.T, 1e-12))


def test_triplet_losses_match_a_plain_loop():
    rng = np.random.default_rng(0)
    e, y = unit(rng, 12, 8), np.repeat(np.arange(4), 3)
    d, margin = distances(e), 0.3
    hard, semi, pairs = [], [], 0
    for a in range(12):
        pos = [p for p in range(12) if y[p] == y[a] and p != a]
        neg = [n for n in range(12) if y[n] != y[a]]
        hard.append(max(0.0, max(d[a, pos]) - min(d[a, neg]) + margin))
        for p in pos:
            farther = [d[a, n] for n in neg if d[a, n] > d[a, p]]
            dn = min(farther) if farther else max(d[a, neg])
            semi.append(max(0.0, d[a, p] - dn + margin))
            pairs += 1
    assert float(triplet_loss(e, y, margin, "hard")) == pytest.approx(np.mean(hard), rel=1e-4)
    assert float(triplet_loss(e, y, margin, "semi-hard")) == pytest.approx(sum(semi) / pairs, rel=1e-4)


def test_contrastive_loss_matches_a_plain_loop():
    rng = np.random.default_rng(1)
    e, y = unit(rng, 8, 4), np.repeat(np.arange(4), 2)
    d = distances(e)
    pos = [d[i, j] ** 2 for i in range(8) for j in range(8) if i != j and y[i] == y[j]]
    neg = [max(0.0, 1.0 - d[i, j]) ** 2 for i in range(8) for j in range(8) if y[i] != y[j]]
    assert float(contrastive_loss(e, y, 1.0)) == pytest.approx(0.5 * (np.mean(pos) + np.mean(neg)),
                                                               rel=1e-4)


def test_arcface_adds_the_margin_to_the_true_class_only():
    rng = np.random.default_rng(2)
    head = ArcMarginHead(5, scale=30.0, margin=0.5)
    head.build((None, 8))
    e, labels = unit(rng, 4, 8), np.array([0, 1, 2, 4])
    w = np.asarray(head.centres)
    cos = e @ (w / np.linalg.norm(w, axis=0, keepdims=True))
    logits = np.asarray(head(e, labels))
    theta = np.arccos(np.clip(cos, -1, 1))
    for i, label in enumerate(labels):
        expected = np.where(theta[i] + 0.5 < math.pi, np.cos(theta[i] + 0.5),
                            cos[i] - math.sin(0.5) * 0.5)
        assert logits[i, label] == pytest.approx(30 * expected[label], abs=1e-3)
        others = [c for c in range(5) if c != label]
        assert np.allclose(logits[i, others], 30 * cos[i, others], atol=1e-4)
    with pytest.raises(ValueError, match="margin"):
        ArcMarginHead(5, margin=2.0)


@needs_lfw
def test_distillation_loss_matches_numpy_and_is_zero_on_the_teacher():
    rng = np.random.default_rng(1)
    s, t = unit(rng, 6, 8), unit(rng, 6, 8)
    direct = np.mean(1 - np.sum(s * t, axis=1))
    off = ~np.eye(6, dtype=bool)
    relation = np.mean(((s @ s.T) - (t @ t.T))[off] ** 2)
    got = float(np.asarray(distillation_loss(s, t, 2.0, 3.0)))
    assert got == pytest.approx(2.0 * direct + 3.0 * relation, rel=1e-5)
    assert float(np.asarray(distillation_loss(t, t, 2.0, 3.0))) == pytest.approx(0.0, abs=1e-5)


def test_recorded_split_is_people_disjoint_and_reproducible(data_dir):  # skips without LFW
    from facewatch.training.lfw import build_split, list_people

    split = json.loads(SPLIT_FILE.read_text())
    rebuilt = build_split(LFW)
    assert rebuilt["val_people"] == split["val_people"]  # the hash rule gives the same people
    people = list_people(LFW)
    val = set(split["val_people"])
    pairs, folds = read_pairs(VAL_PAIRS_FILE)
    assert len(pairs) == split["val_pairs"] and sorted(set(folds)) == list(range(10))
    assert sum(p.same for p in pairs) == len(pairs) // 2
    for p in pairs:
        assert p.name1 in val and p.name2 in val
        assert p.index1 in people[p.name1] and p.index2 in people[p.name2]
    assert len({(p.name1, p.index1, p.name2, p.index2) for p in pairs}) == len(pairs)


def train(*extra: str):
    from facewatch.daemon.cli import build_parser
    from facewatch.training.train_embedder import train as train_run

    argv = ["train-embedder", "--backbone", "micro", "--epochs", "1", "--steps-per-epoch", "2",
            "--batch", "16", "--max-people", "12", "--val-pairs", "100", "--embedding-size", "16",
            *extra]
    return train_run(build_parser("train-embedder").parse_args(argv))


@needs_lfw
@pytest.mark.parametrize("loss", ["arcface", "triplet", "contrastive"])
def test_short_run_writes_checkpoint_and_summary(runs, loss):
    run_dir = train("--loss", loss, "--out", f"run-{loss}")
    for name in ("last.weights.h5", "state.json", "embedder.keras", "best.keras", "curves.png",
                 "summary.json"):
        assert (run_dir / name).is_file(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["loss"] == loss and summary["epochs_done"] == 1 and summary["steps"] == 2
    assert 0.0 <= summary["val"]["accuracy"] <= 1.0 and summary["val"]["pairs"] == 100
    assert summary["data"]["train_people"] == 12
    assert np.isfinite(summary["history"][0]["loss"])
    # 100 pairs hold too few people for a 60-person gallery and strangers: no one-shot figure
    # (evaluate-embedder's test covers one that has them)
    assert summary["history"][0]["val_tpir_at_fpir_1e2"] is None


@needs_lfw
def test_resume_continues_from_the_checkpoint(runs):
    run_dir = runs / "embedder" / "run-arcface"
    if not (run_dir / "state.json").is_file():
        train("--loss", "arcface", "--out", "run-arcface")
    with pytest.raises(ValueError, match="--resume"):
        train("--loss", "arcface", "--out", "run-arcface")  # never silently overwrite a run
    # The command's --loss is ignored on resume: the run's own settings win.
    run_dir = train("--loss", "triplet", "--out", "run-arcface", "--resume", "--epochs", "2")
    state = json.loads((run_dir / "state.json").read_text())
    assert state["epoch"] == 2 and state["step"] == 4
    assert [h["epoch"] for h in state["history"]] == [1, 2]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["loss"] == "arcface"
    # embedder.keras is epoch 2 whichever epoch was best: --val-of last describes it, also for a
    # summary written before `last_val` existed (read from its history)
    from facewatch.export.embedder_onnx import validation_of

    last = validation_of(summary, "last")
    assert last["epoch"] == 2 and last["accuracy"] == state["history"][1]["val_accuracy"]
    assert "threshold_at_far_1e-3" in last
    legacy = validation_of({k: v for k, v in summary.items() if k != "last_val"}, "last")
    assert legacy["epoch"] == 2 and legacy["auc"] == last["auc"]
    assert summary["val"]["pairs"] == 100   # the best epoch's figures survive the resume
    assert validation_of(summary, "best") == summary["val"]
    lost = {**summary, "val": {}}   # a resumed run's summary that had lost its best's figures
    assert validation_of(lost, "best")["epoch"] == summary["best_epoch"]
    assert validation_of(lost, "best")["pairs"] == summary["data"]["val_pairs"] == 100


@needs_lfw
def test_committed_checkpoint_resumes_a_run_on_a_fresh_machine(runs, tmp_path):
    """--checkpoint-dir keeps the network without the optimizer's moments; with runs/ gone (a
    fresh clone) --resume restarts from it at the next epoch with the same weights."""
    import shutil

    from facewatch.training.train_embedder import COMMITTED_WEIGHTS

    committed = tmp_path / "checkpoints" / "run-committed"
    run_dir = train("--out", "run-committed", "--checkpoint-dir", str(committed))
    saved = dict(np.load(committed / COMMITTED_WEIGHTS))
    assert len(saved) > 10 and any(k.endswith("centres") for k in saved)
    assert all(v.dtype == (np.float16 if k.endswith("centres") else np.float32)
               for k, v in saved.items())
    full = (run_dir / "last.weights.h5").stat().st_size
    assert (committed / COMMITTED_WEIGHTS).stat().st_size < 0.6 * full, "optimizer state kept"
    shutil.rmtree(run_dir)
    with pytest.raises(FileNotFoundError, match="run-committed"):
        train("--out", "run-committed", "--resume", "--epochs", "2")   # no --checkpoint-dir
    run_dir = train("--out", "run-committed", "--resume", "--epochs", "2",
                    "--checkpoint-dir", str(committed))
    state = json.loads((run_dir / "state.json").read_text())
    assert state["epoch"] == 2 and state["step"] == 4 and [h["epoch"] for h in state["history"]] == [1, 2]
    assert (run_dir / "best.keras").is_file(), "the first validated epoch after a move is the best"
    assert json.loads((committed / "state.json").read_text())["epoch"] == 2
    # A checkpoint of another network is refused by name, not loaded halfway.
    other = tmp_path / "checkpoints" / "other"
    other.mkdir()
    shutil.copy(committed / "state.json", other / "state.json")
    np.savez(other / COMMITTED_WEIGHTS, **{k: v[..., :1] if v.ndim else v for k, v in saved.items()})
    shutil.rmtree(run_dir)
    with pytest.raises(ValueError, match="does not fit this network"):
        train("--out", "run-committed", "--resume", "--epochs", "3", "--checkpoint-dir", str(other))
    # A damaged file is named, not a numpy traceback.
    (other / COMMITTED_WEIGHTS).write_bytes(b"not an npz" * 10)
    with pytest.raises(ValueError, match=f"{COMMITTED_WEIGHTS}: not a weights file"):
        train("--out", "run-committed", "--resume", "--epochs", "3", "--checkpoint-dir", str(other))
    (other / "state.json").write_text("{truncated")
    with pytest.raises(ValueError, match="state.json: not a run state"):
        train("--out", "run-committed", "--resume", "--epochs", "3", "--checkpoint-dir", str(other))


@needs_lfw
def test_aligned_run_with_the_dlib_teacher(runs):
    """Five-point crops on dlib landmarks and the distillation term, through a real short run."""
    pytest.importorskip("dlib", reason="the teacher extra (dlib-bin) is not installed")
    run_dir = train("--loss", "arcface", "--out", "run-teacher", "--embedding-size", "128",
                    "--alignment", "five_point", "--landmarks", "dlib", "--teacher", "dlib")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["crop_alignment"] == "five_point"
    assert summary["data"]["teacher"] == "dlib_face_recognition_resnet_model_v1"
    # Most LFW faces get plausible dlib landmarks; a few fall back to the box.
    assert summary["data"]["aligned_on_landmarks"] >= 0.9 * (summary["data"]["train_images"])
    assert np.isfinite(summary["history"][0]["loss"])


@needs_lfw
def test_arcface_aligned_run_on_yunet_landmarks(runs):
    """The teacher's geometry: YuNet's five points in our detector's boxes, the ArcFace template."""
    from facewatch.training.wheel_models import YUNET, wheel_model_path

    try:
        wheel_model_path(YUNET)
    except FileNotFoundError as exc:
        pytest.skip(f"YuNet not installed: {exc}")
    run_dir = train("--loss", "arcface", "--out", "run-arcface-align",
                    "--alignment", "arcface_five_point", "--landmarks", "yunet")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["crop_alignment"] == "arcface_five_point"
    assert "yunet 5-point" in summary["data"]["boxes_from"]
    assert summary["data"]["aligned_on_landmarks"] >= 0.9 * summary["data"]["train_images"]
    assert np.isfinite(summary["history"][0]["loss"])


@needs_lfw
def test_sface_teacher_run_with_a_folder_of_unlabelled_faces(runs, tmp_path):
    """SFace targets on ArcFace-aligned crops, plus faces of a plain folder of photos."""
    import shutil

    from facewatch.training.wheel_models import SFACE, wheel_model_path

    try:
        wheel_model_path(SFACE)
    except FileNotFoundError as exc:
        pytest.skip(f"SFace not installed: {exc}")
    folder = tmp_path / "faces"
    folder.mkdir()
    for src in sorted(LFW.glob("Z*/*.jpg"))[:8]:
        shutil.copy(src, folder / src.name)
    run_dir = train("--loss", "arcface", "--out", "run-sface", "--embedding-size", "128",
                    "--teacher", "sface", "--alignment", "arcface_five_point", "--landmarks", "yunet",
                    "--unlabelled-folder", str(folder), "--consistent-share", "0.5")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["data"]["teacher"].startswith("face_recognition_sface_2021dec")
    unlabelled = summary["data"]["unlabelled"]
    assert unlabelled["faces"] == unlabelled["folders"][str(folder)]["faces"] == 8
    assert summary["loss"] == ("arcface + sface distillation, 50% of each batch taught on its "
                               "augmented crop")
    assert np.isfinite(summary["history"][0]["loss"])
    with pytest.raises(ValueError, match="--alignment arcface_five_point"):
        train("--out", "refused", "--embedding-size", "128", "--teacher", "sface",
              "--unlabelled-folder", str(folder))
    with pytest.raises(ValueError, match="--consistent-share needs --teacher sface"):
        train("--out", "refused", "--embedding-size", "128", "--teacher", "dlib",
              "--consistent-share", "0.5")
