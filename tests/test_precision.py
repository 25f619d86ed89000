"""fp32 or int8 per execution provider (models.precision, stages/precision.py; issue 14), with the
real model files: which file a stage loads, what validate-config refuses, and what the running
daemon's /metrics and log say."""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import MODELS_DIR, REPO, landmark_alignment, wait_for, write_config
from facewatch.daemon.config import ConfigError, parse_config
from facewatch.stages.errors import SetupError
from facewatch.stages.precision import choose, int8_sibling
from test_pipeline import metric, scrape

LANDMARKS = MODELS_DIR / "face_landmarks.onnx"
EMBEDDER = MODELS_DIR / "face_embedder.onnx"
needs_int8 = pytest.mark.skipif(not (int8_sibling(LANDMARKS).is_file()
                                     and int8_sibling(EMBEDDER).is_file()),
                                reason="the committed int8 copies are not present")


def models_section(folder, **extra) -> object:
    cfg = parse_config({"cameras": [{"name": "c", "uri": "/dev/null"}],
                        "models": {"detector": str(folder / "face_detector.onnx"),
                                   "embedder": str(folder / "face_embedder.onnx"),
                                   "landmarks": str(folder / "face_landmarks.onnx"),
                                   "providers": ["CPUExecutionProvider"], **extra}}, folder, "test")
    return cfg.models


@needs_int8
def test_the_file_each_model_runs_follows_precision_and_what_is_there(tmp_path):
    for name in ("face_detector.onnx", "face_landmarks.onnx", "face_landmarks.int8.onnx",
                 "face_embedder.onnx"):
        (tmp_path / name).symlink_to(MODELS_DIR / name)
    # the embedder's int8 "copy" here was made from another file: stale, never used
    (tmp_path / "face_embedder.int8.onnx").symlink_to(MODELS_DIR / "face_landmarks.int8.onnx")

    m = models_section(tmp_path, precision={"CPUExecutionProvider": "int8"})
    lm, det, emb = choose(m, "landmarks"), choose(m, "detector"), choose(m, "embedder")
    assert (lm.path.name, lm.precision, lm.provider) == ("face_landmarks.int8.onnx", "int8",
                                                         "CPUExecutionProvider")
    assert (det.path.name, det.precision) == ("face_detector.onnx", "fp32")
    assert "face_detector.int8.onnx not found" in det.why
    assert (emb.path.name, emb.precision) == ("face_embedder.onnx", "fp32") and "stale" in emb.why

    fp32 = models_section(tmp_path, precision={"CPUExecutionProvider": "fp32"})
    assert choose(fp32, "landmarks").path.name == "face_landmarks.onnx"

    # a named int8 file replaces the sibling; precision int8 said outright, since the default
    # (auto) keeps fp32 on a CPU where int8 is not >= 5% faster (an Intel Xeon host, stop 27)
    int8 = {"CPUExecutionProvider": "int8"}
    named = models_section(tmp_path, precision=int8,
                           embedder_int8=str(MODELS_DIR / "face_embedder.int8.onnx"))
    assert (choose(named, "embedder").precision, choose(named, "embedder").path) == \
        ("int8", MODELS_DIR / "face_embedder.int8.onnx")
    wrong = models_section(tmp_path, precision=int8,
                           embedder_int8=str(tmp_path / "face_embedder.int8.onnx"))
    with pytest.raises(SetupError, match="models.embedder_int8: .*quantised from another file"):
        choose(wrong, "embedder")


@pytest.mark.parametrize("precision", ["int8", "auto"])
def test_int8_and_auto_are_refused_for_gpu_providers(precision):
    with pytest.raises(ConfigError, match="int8 and auto are for .*CPUExecutionProvider.* only"):
        models_section(MODELS_DIR, precision={"CUDAExecutionProvider": precision})


def test_validate_config_names_a_missing_int8_file(tmp_path):
    missing = tmp_path / "nowhere" / "face_embedder.int8.onnx"
    config = write_config(tmp_path / "config.yaml", [{"name": "c", "uri": "/dev/video0"}],
                          models={"embedder_int8": str(missing)})
    result = subprocess.run([sys.executable, "-m", "facewatch.daemon.cli", "validate-config", str(config)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    out = result.stdout + result.stderr
    assert result.returncode == 78, out
    assert "models.embedder_int8" in out and str(missing) in out and "quantize-model" in out


@needs_int8
def test_the_daemon_says_which_precision_each_model_runs_at(short_video, short_dir, daemons):
    config = write_config(short_dir / "config.yaml",
                          [{"name": "lobby", "uri": str(short_video.path), "loop": True}],
                          runtime={"dir": str(short_dir / "run")},
                          models={"precision": {"CPUExecutionProvider": "int8"}})
    port = yaml.safe_load(config.read_text())["metrics"]["port"]
    daemon = daemons(config, short_dir / "run")
    daemon.wait_ready(120)
    want = {("detect", "detector", "fp32" if not int8_sibling(MODELS_DIR / "face_detector.onnx")
             .is_file() else "int8"), ("detect", "landmarks", "int8"), ("embed", "embedder", "int8")}
    samples = wait_for(lambda: (s := scrape(port)) and all(
        metric(s, "facewatch_model_precision", stage=st, model=k, precision=p) == 1
        for st, k, p in want) and s, 30, "facewatch_model_precision for every model")
    assert metric(samples, "facewatch_model_precision", stage="embed", model="embedder",
                  precision="fp32") == 0
    text = daemon.log_text()
    assert "embedder face_embedder.int8.onnx at int8 on CPUExecutionProvider" in text
    assert "landmarks face_landmarks.int8.onnx at int8" in text
    assert daemon.stop() == 0


def test_a_copy_without_its_sibling_runs_fp32(tmp_path):
    shutil.copy(LANDMARKS, tmp_path / "face_landmarks.onnx")
    m = models_section(tmp_path)
    choice = choose(m, "landmarks")
    assert (choice.path, choice.precision) == (tmp_path / "face_landmarks.onnx", "fp32")


def test_a_corrupt_int8_copy_is_named_and_a_wrong_model_still_names_the_configured_file(tmp_path):
    from facewatch.stages.errors import ModelError
    from facewatch.stages.face_landmarks import landmark_model_from_config

    (tmp_path / "face_landmarks.onnx").symlink_to(LANDMARKS)
    (tmp_path / "face_landmarks.int8.onnx").write_bytes(b"not an onnx file")
    m = models_section(tmp_path, precision={"CPUExecutionProvider": "int8"})
    with pytest.raises(ModelError, match="face_landmarks.int8.onnx"):
        landmark_model_from_config(m, landmark_alignment(LANDMARKS))
    # auto cannot time the copy: the float file runs, and the reason names the copy
    auto = choose(models_section(tmp_path), "landmarks")
    assert (auto.path.name, auto.precision) == ("face_landmarks.onnx", "fp32")
    assert "not timed" in auto.why and "face_landmarks.int8.onnx" in auto.why
    # the configured file is the wrong kind (an embedder) and has an int8 sibling: the error
    # names the configured file, as without int8 copies
    (tmp_path / "face_landmarks.onnx").unlink()
    (tmp_path / "face_landmarks.int8.onnx").unlink()
    (tmp_path / "face_landmarks.onnx").symlink_to(EMBEDDER)
    (tmp_path / "face_landmarks.int8.onnx").symlink_to(int8_sibling(EMBEDDER))
    with pytest.raises(ModelError) as exc:
        landmark_model_from_config(models_section(tmp_path, precision={"CPUExecutionProvider": "int8"}),
                                   landmark_alignment(LANDMARKS))
    assert str(tmp_path / "face_landmarks.onnx") in str(exc.value)


@pytest.mark.parametrize("spin_wait", [False, True])
def test_models_spin_wait_reaches_every_onnxruntime_session(spin_wait):
    """models.spin_wait (default off: spinning threads starve decoding and the other stages on
    a shared CPU) is what the detector, landmark and embedder sessions run with."""
    from facewatch.stages.face_detector import detector_from_config
    from facewatch.stages.face_embedder import embedder_from_config
    from facewatch.stages.face_landmarks import landmark_model_from_config

    from facewatch.stages.embedder_info import read_embedder_info

    m = models_section(MODELS_DIR, **({"spin_wait": True} if spin_wait else {}))
    alignment = read_embedder_info(m.embedder).crop_spec(None, None).alignment
    sessions = {"detector": detector_from_config(m).session,
                "landmarks": landmark_model_from_config(m, alignment).session,
                "embedder": embedder_from_config(m).session}
    want = "1" if spin_wait else "0"
    assert {k: s.get_session_options().get_session_config_entry(
        "session.intra_op.allow_spinning") for k, s in sessions.items()} == \
        dict.fromkeys(sessions, want)


# --- auto: int8 only where this CPU runs it clearly faster (stages/int8_probe.py) -------------

@needs_int8
def test_auto_times_each_model_once_per_host_and_takes_the_faster_file(tmp_path, monkeypatch):
    from facewatch.stages import int8_probe

    monkeypatch.setenv("FACEWATCH_CACHE_DIR", str(tmp_path / "cache"))
    m = models_section(MODELS_DIR)   # the CPU default is auto
    first = {kind: choose(m, kind) for kind in ("landmarks", "embedder")}
    entries = json.loads((tmp_path / "cache" / int8_probe.CACHE_FILE).read_text())
    assert len(entries) == 2
    for kind, choice in first.items():
        (timed,) = [v for k, v in entries.items() if k.startswith(f"{kind}|")]
        assert timed["fp32_ms"] > 0 and timed["int8_ms"] > 0
        faster = timed["int8_ms"] <= int8_probe.INT8_MARGIN * timed["fp32_ms"]
        assert (choice.path.name, choice.precision) == \
            ((f"face_{kind}.int8.onnx", "int8") if faster else (f"face_{kind}.onnx", "fp32"))
        assert choice.why.startswith("models.precision: auto, int8 ") and "ms a call" in choice.why
    # later starts (every stage, every restart) read the verdict instead of timing again
    monkeypatch.setattr(int8_probe, "measure", lambda *a, **k: pytest.fail("timed again"))
    assert {kind: choose(m, kind) for kind in first} == first


@needs_int8
@pytest.mark.parametrize(("int8_ms", "want"), [(5.0, "int8"), (9.6, "fp32"), (14.0, "fp32")])
def test_auto_takes_int8_only_when_clearly_faster(tmp_path, monkeypatch, int8_ms, want):
    """Within 5% the float file, the accuracy reference, runs."""
    from facewatch.stages import int8_probe

    monkeypatch.setenv("FACEWATCH_CACHE_DIR", str(tmp_path))
    key = int8_probe.probe_key("embedder", EMBEDDER, int8_sibling(EMBEDDER), 0)
    (tmp_path / int8_probe.CACHE_FILE).write_text(json.dumps(
        {key: {"fp32_ms": 10.0, "int8_ms": int8_ms, "measured": "2026-12-01T00:00:00Z"}}))
    choice = choose(models_section(MODELS_DIR), "embedder")
    assert choice.precision == want
    assert f"int8 {10.0 / int8_ms:.2f}x fp32 on this CPU ({int8_ms:.1f} vs 10.0 ms" in choice.why


@needs_int8
def test_a_corrupt_or_unwritable_speed_cache_is_named_and_the_daemon_still_chooses(tmp_path, monkeypatch,
                                                                                 caplog):
    from facewatch.stages import int8_probe

    cache = tmp_path / int8_probe.CACHE_FILE
    cache.write_text("{half a file")
    monkeypatch.setenv("FACEWATCH_CACHE_DIR", str(tmp_path))
    with caplog.at_level(logging.WARNING, "facewatch.int8_probe"):
        choice = choose(models_section(MODELS_DIR), "landmarks")
    assert f"int8 speed cache {cache} is unreadable" in caplog.text
    assert "auto, int8" in choice.why
    assert [k.split("|")[0] for k in json.loads(cache.read_text())] == ["landmarks"]   # replaced

    blocker = tmp_path / "a_file"   # the cache folder cannot be made: a file is in the way
    blocker.write_text("")
    monkeypatch.setenv("FACEWATCH_CACHE_DIR", str(blocker))
    caplog.clear()
    with caplog.at_level(logging.WARNING, "facewatch.int8_probe"):
        choice = choose(models_section(MODELS_DIR), "landmarks")
    assert f"int8 speed cache {blocker / int8_probe.CACHE_FILE} not written" in caplog.text
    assert "auto, int8" in choice.why
