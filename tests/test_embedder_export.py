"""Export round trip: our training code's model -> ONNX -> onnxruntime/FaceEmbedder, on real face crops."""
from __future__ import annotations

import json

import numpy as np
import pytest

from facewatch.stages.face_crop import crop_face
from facewatch.stages.onnx_session import ModelError
from facewatch.training.lfw import default_images_dir
from facewatch.training.paths import REPO_ROOT

LFW = default_images_dir()
COMMITTED_MODEL = REPO_ROOT / "models" / "face_embedder.onnx"


def lfw_crops(count: int = 6) -> np.ndarray:
    """BGR crops of real LFW faces, as the daemon makes them (crop_face on a face box)."""
    if not LFW.is_dir():
        pytest.skip(f"LFW images not found at {LFW} (set FACEWATCH_DATA to the shared data folder)")
    from facewatch.training.embedder_data import centre_box, read_image

    paths = sorted(LFW.glob("*/*_0001.jpg"))[::700][:count]
    frames = [read_image(p) for p in paths]
    return np.stack([crop_face(f, centre_box(f.shape), 112, 1.3) for f in frames])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A random-init micro model saved as .keras and exported with its metadata."""
    import keras

    from facewatch.export.embedder_onnx import export_embedder
    from facewatch.training.embedder_model import build_embedder

    keras.utils.set_random_seed(0)
    tmp = tmp_path_factory.mktemp("embedder")
    model = build_embedder("micro", embedding_size=32)
    # Non-trivial BatchNorm statistics, so that inference-mode BN is really exercised.
    bn = model.get_layer("projection_bn")
    bn.moving_mean.assign(np.full(32, 0.1, np.float32))
    bn.moving_variance.assign(np.full(32, 2.0, np.float32))
    keras_path = tmp / "embedder.keras"
    model.save(keras_path)
    summary = {"backbone": "micro", "crop_scale": 1.3, "flip_average": True, "threshold": 0.42,
               "loss": "arcface", "val": {"accuracy": 0.5, "auc": 0.5, "pairs": 10},
               "data": {"train_people": 1}}
    onnx_path = tmp / "face_embedder.onnx"
    report = export_embedder(keras_path, onnx_path, summary)
    return model, onnx_path, report


def test_onnx_matches_keras_on_real_crops(exported):
    import onnxruntime as ort

    model, onnx_path, report = exported
    assert report["max_abs_diff"] <= 1e-4
    crops = lfw_crops()
    x = np.ascontiguousarray(crops[..., ::-1], dtype=np.float32)  # RGB 0..255, as the runtime feeds it
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    want = model.predict(x, verbose=0)
    assert got.shape == (len(crops), 32)
    assert np.max(np.abs(got - want)) <= 1e-4
    # Dynamic batch axis: a single face gives the same row.
    one = session.run(None, {session.get_inputs()[0].name: x[:1]})[0]
    assert np.max(np.abs(one[0] - got[0])) <= 1e-4


def test_face_embedder_reads_metadata_and_returns_unit_vectors(exported):
    from facewatch.stages.face_embedder import FaceEmbedder

    _, onnx_path, _ = exported
    embedder = FaceEmbedder(onnx_path, providers=("CPUExecutionProvider",))
    assert (embedder.input_size, embedder.embedding_size) == (112, 32)
    assert embedder.threshold == pytest.approx(0.42)
    assert embedder.crop_scale == pytest.approx(1.3)
    assert embedder.channel_order == "RGB" and embedder.flip_average is True
    assert json.loads(embedder.session.get_modelmeta().custom_metadata_map["metrics"])["pairs"] == 10
    emb = embedder.embed(lfw_crops(4))
    assert emb.shape == (4, 32) and emb.dtype == np.float32
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert embedder.embed(np.zeros((0, 112, 112, 3), np.uint8)).shape == (0, 32)


def test_export_refuses_a_model_that_does_not_match(exported):
    from facewatch.export.keras_onnx import ExportError, verify
    from facewatch.training.embedder_model import build_embedder

    _, onnx_path, _ = exported
    other = build_embedder("micro", embedding_size=32)  # different random weights
    with pytest.raises(ExportError, match="differ"):
        verify(onnx_path, other, np.ascontiguousarray(lfw_crops(2)[..., ::-1], dtype=np.float32), 1e-4)


def test_garbage_and_foreign_onnx_files_are_refused_by_name(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from facewatch.stages.face_embedder import FaceEmbedder

    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model at all")
    with pytest.raises(ModelError, match="garbage.onnx"):
        FaceEmbedder(garbage, providers=("CPUExecutionProvider",))
    # A well-formed ONNX (N,112,112,3)->(N,D) model without our metadata is not an embedder.
    inp = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 112, 112, 3])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 4])
    graph = helper.make_graph([helper.make_node("Slice", ["x", "s", "e", "a"], ["t"]),
                               helper.make_node("Reshape", ["t", "shape"], ["y"])], "foreign",
                              [inp], [out], [shape,
                                             helper.make_tensor("s", TensorProto.INT64, [4], [0, 0, 0, 0]),
                                             helper.make_tensor("e", TensorProto.INT64, [4], [2**62, 1, 1, 3]),
                                             helper.make_tensor("a", TensorProto.INT64, [4], [0, 1, 2, 3])])
    foreign = tmp_path / "foreign.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), foreign)
    with pytest.raises(ModelError, match="foreign.onnx.*facewatch_embedder"):
        FaceEmbedder(foreign, providers=("CPUExecutionProvider",))


def test_export_command_reports_a_missing_checkpoint(tmp_path):
    from facewatch.daemon.cli import main

    assert main(["export-embedder", "--model", str(tmp_path / "nope.keras"),
                 "--out", str(tmp_path / "x.onnx")]) == 2
    assert not (tmp_path / "x.onnx").exists()



def test_export_refuses_a_summary_without_the_epoch_asked_for(tmp_path, caplog):
    """--val-of last on a summary with no validated epoch, or with no summary at all: one line
    naming the file, before --out is touched."""
    from facewatch.daemon.cli import main

    out = tmp_path / "x.onnx"
    out.write_bytes(b"the shipped file")
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"val": {"accuracy": 0.9}, "history": [{"epoch": 1, "loss": 2.0}]}))
    argv = ["export-embedder", "--model", str(tmp_path / "embedder.keras"), "--out", str(out),
            "--val-of", "last"]
    assert main(argv + ["--summary", str(summary)]) == 2
    assert str(summary) in caplog.text and "no usable validation figures" in caplog.text
    caplog.clear()
    lone = ["export-embedder", "--model", str(tmp_path / "run" / "embedder.keras"), "--out",
            str(out), "--val-of", "last"]
    assert main(lone) == 2   # no summary.json beside the model
    assert "--val-of last needs the run's summary.json" in caplog.text
    assert out.read_bytes() == b"the shipped file"


def test_export_refuses_a_landmark_model_it_cannot_align_with_before_writing(exported, tmp_path,
                                                                             caplog):
    """An embedder aligned on the other layout's points than the shipped landmark model places:
    the FAR-table step would align with that model (or a missing file), so the export stops
    before --out is written, naming the file and --landmarks."""
    from conftest import MODELS_DIR, landmark_alignment
    from facewatch.daemon.cli import main

    shipped = landmark_alignment(MODELS_DIR / "face_landmarks.onnx")
    other = "five_point" if shipped == "arcface_five_point" else "arcface_five_point"
    _, onnx_path, _ = exported
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"backbone": "micro", "crop_alignment": other,
                                   "threshold": 0.42, "val": {"accuracy": 0.5}}))
    out = tmp_path / "face_embedder.onnx"
    base = ["export-embedder", "--model", str(onnx_path.parent / "embedder.keras"),
            "--out", str(out), "--summary", str(summary)]
    assert main(base) == 1
    assert "face_landmarks.onnx" in caplog.text and "--landmarks" in caplog.text
    missing = tmp_path / "nowhere" / "landmarks.onnx"
    assert main([*base, "--landmarks", str(missing)]) == 1
    assert str(missing) in caplog.text
    assert not out.exists()


@pytest.mark.skipif(not COMMITTED_MODEL.is_file(), reason=f"{COMMITTED_MODEL} not exported yet")
def test_committed_model_accuracy_on_validation_pairs(capsys):
    """Regression gate: the committed embedder on 600 of the fixed validation pairs."""
    if not LFW.is_dir():
        pytest.skip(f"LFW images not found at {LFW}")
    from facewatch.daemon.cli import main

    assert main(["evaluate-embedder", "--model", str(COMMITTED_MODEL), "--max-pairs", "600",
                 "--images", str(LFW)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["accuracy"] > 0.8, result
    # one-shot identification on the same embeddings: the 600 pairs' images hold 151 people with
    # two photos or more, so 60 are enrolled and 91 are strangers (the stop-26 file: 0.78 on all
    # 178 validation people)
    open_set = result["open_set"]
    assert open_set["gallery_size"] == 60 and open_set["people"] == 151, open_set
    assert open_set["tpir_at_fpir"]["0.01"] > 0.6, open_set


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_export_writes_the_impostor_far_table(exported):
    """export-embedder measures the open-set table of what it exported (runtime path, validation
    pairs) and writes it into the file's metadata, where the daemon's match.target_far reads it."""
    from facewatch.export.embedder_onnx import measure_open_set
    from facewatch.stages.embed_stage import read_embedder_info
    from facewatch.training.lfw import default_images_dir

    if not default_images_dir().is_dir():
        pytest.skip(f"LFW not found at {default_images_dir()}")
    _, onnx_path, _ = exported
    assert read_embedder_info(onnx_path).far_table is None
    table = measure_open_set(onnx_path)
    info = read_embedder_info(onnx_path)
    assert info.far_table == table and table.pairs > 100_000
    assert info.threshold == 0.42   # the rest of the metadata is kept
    # the CLI then makes the table's FAR 1e-3 point the metadata threshold (no --threshold)
    from facewatch.export.embedder_onnx import adopt_table_threshold

    adopted = adopt_table_threshold(onnx_path, table)
    assert adopted == pytest.approx(table.threshold_at(1e-3)[0]) and adopted != 0.42
    info = read_embedder_info(onnx_path)
    assert info.threshold == pytest.approx(adopted) and info.far_table == table


def test_at_face_height_blurs_a_large_face_and_leaves_a_small_one():
    from facewatch.stages.quality import sharpness
    from facewatch.training.embedder_data import at_face_height

    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (200, 200, 3), np.uint8)
    box = np.array([50, 50, 150, 150], np.float32)      # a 100 px face
    small = at_face_height(frame, box, 25)
    assert small.shape == frame.shape
    assert sharpness(small[None])[0] < 0.2 * sharpness(frame[None])[0]
    assert at_face_height(frame, box, 120) is frame      # already smaller than asked


@pytest.mark.skipif(not COMMITTED_MODEL.is_file(), reason=f"{COMMITTED_MODEL} not exported yet")
def test_evaluate_embedder_face_px_reports_smaller_faces(capsys):
    """--face-px crops the validation faces as if they were that small: the crops the quality
    gate sees get softer; and it refuses to write that degraded table into the model."""
    if not LFW.is_dir():
        pytest.skip(f"LFW images not found at {LFW}")
    from facewatch.daemon.cli import main

    assert main(["evaluate-embedder", "--model", str(COMMITTED_MODEL), "--max-pairs", "600",
                 "--images", str(LFW), "--face-px", "32"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["face_px"] == 32 and result["accuracy"] > 0.7, result
    # the photos' faces are ~100 px (crop sharpness p50 ~113 as they are); as 32 px faces
    # their crops lose most of their detail
    assert result["crop_sharpness"]["p50"] < 40, result["crop_sharpness"]
    with pytest.raises(SystemExit):   # argparse: not a face height
        main(["evaluate-embedder", "--model", str(COMMITTED_MODEL), "--face-px", "-3"])
    assert "--face-px must be a face height of at least 4 pixels, got '-3'" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit, match="--write-metadata with --face-px"):
        main(["evaluate-embedder", "--model", str(COMMITTED_MODEL), "--face-px", "32",
              "--write-metadata"])


@pytest.mark.skipif(not COMMITTED_MODEL.is_file(), reason=f"{COMMITTED_MODEL} not exported yet")
def test_evaluate_embedder_measures_the_teacher_on_the_daemons_crops(capsys, caplog):
    """`--model sface:96`: the SFace teacher on the runtime crops (our detector and landmarks) at
    the student's size: the ceiling a student that reproduced its teacher would reach (0.997 on
    all 6,000 pairs), well above the shipped student on the same pairs."""
    from facewatch.training.wheel_models import SFACE, wheel_model_path

    try:
        wheel_model_path(SFACE)
    except FileNotFoundError as exc:
        pytest.skip(f"SFace not installed: {exc}")
    if not LFW.is_dir():
        pytest.skip(f"LFW images not found at {LFW}")
    from facewatch.daemon.cli import main

    scores = {}
    for model in ("sface:96", str(COMMITTED_MODEL)):
        assert main(["evaluate-embedder", "--model", model, "--max-pairs", "600",
                     "--images", str(LFW)]) == 0
        scores[model] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    teacher = scores["sface:96"]
    assert teacher["crop_alignment"] == "arcface_five_point" and teacher["accuracy"] > 0.98, teacher
    assert teacher["accuracy"] > scores[str(COMMITTED_MODEL)]["accuracy"]
    with pytest.raises(SystemExit, match="--write-metadata needs an ONNX file"):
        main(["evaluate-embedder", "--model", "sface", "--write-metadata"])
    for bad in ("sface:big", "sface:0"):
        assert main(["evaluate-embedder", "--model", bad, "--max-pairs", "60",
                     "--images", str(LFW)]) != 0
        assert f"takes a crop size of at least 32 pixels, got {bad}" in caplog.text
    from facewatch.training.evaluate_embedder import is_teacher

    assert is_teacher("sface") and is_teacher("sface:96") and not is_teacher("sface_student.onnx")
