"""Config: the shipped file validates and documents the real defaults; errors name the key path,
line and value; secrets never appear in errors; paths resolve where they should."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from facewatch.daemon.config import (ConfigError, FacewatchConfig, config_from_json, config_to_json,
                           load_config, parse_camera_arg, parse_config, redact_uri,
                           with_runtime_dir)
from facewatch.stages.transport import Endpoints


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def validate_cli(path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "facewatch.daemon.cli", "validate-config", str(path)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)


def test_shipped_config_validates_with_the_cli():
    result = validate_cli(REPO / "config.yaml")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("OK")


def test_shipped_config_documents_the_defaults():
    """Every section of config.yaml states exactly the values the code uses by default, so the
    documentation cannot drift from the schema."""
    data = yaml.safe_load((REPO / "config.yaml").read_text())
    shipped = parse_config(data, REPO)
    defaults = parse_config({"cameras": data["cameras"]}, REPO)
    # the model files are left out on purpose: absent means the shipped models (documented in
    # comments), so a config copied to /etc/facewatch still finds them
    shipped_models = {"detector", "embedder", "landmarks"}
    text = (REPO / "config.yaml").read_text()
    assert all(f"# {key}: " in text for key in shipped_models)
    for section in FacewatchConfig.model_fields:
        if section != "cameras":
            assert getattr(shipped, section) == getattr(defaults, section), section
            left_out = shipped_models if section == "models" else set()
            assert set(data[section]) | left_out == \
                set(type(getattr(shipped, section)).model_fields), section


def test_unknown_key_names_path_line_and_value(tmp_path):
    path = write(tmp_path, "cameras:\n  - name: a\n    uri: x.mp4\ndetect:\n  batch_max: 4\n"
                           "  tracker_kind: sort\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert "detect.tracker_kind (line 6)" in str(exc.value)
    assert "'sort'" in str(exc.value) and str(path) in str(exc.value)
    result = validate_cli(path)
    assert result.returncode != 0 and "detect.tracker_kind" in result.stderr


@pytest.mark.parametrize("section,key,value,needle", [
    ("detect", "batch_max", 0, "greater than or equal to 1"),
    ("detect", "tracker", "'botsort'", "'bytetrack'"),
    ("embed", "votes", "many", "valid integer"),
    ("models", "detector_imgsz", 100, "multiple of 32"),
    ("models", "providers", "[CUDA]", "execution provider"),
    ("publish", "endpoint", "'udp://x'", "tcp://HOST:PORT"),
    ("runtime", "transport", "'shm'", "'ipc' or 'tcp'"),
    ("supervisor", "stages", "[detect, crop]", "unknown stages"),
    ("supervisor", "nice", "{crop: 5}", "unknown stages"),
    ("supervisor", "nice", "{embed: -5}", "0-19"),
    ("detect", "lanes", -1, "greater than or equal to 0"),
])
def test_bad_values_are_named(tmp_path, section, key, value, needle):
    path = write(tmp_path, f"cameras:\n  - name: a\n    uri: x.mp4\n{section}:\n  {key}: {value}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    text = str(exc.value)
    assert f"{section}.{key} (line 5)" in text and needle in text, text


@pytest.mark.parametrize("text,where,needle", [
    # wrong types: a scalar, a whole section, a list where a mapping belongs, a short roi
    ("cameras:\n  - name: a\n    uri: x.mp4\n    fps_cap: ten\n", "cameras[0].fps_cap (line 4)",
     "valid number"),
    ("cameras:\n  - name: a\n    uri: x.mp4\ndetect: 5\n", "detect (line 4)",
     "valid dictionary"),
    ("cameras:\n  name: a\n  uri: x.mp4\n", "cameras (line 1)", "valid list"),
    ("cameras:\n  - name: a\n    uri: x.mp4\nmetrics:\n  enabled: maybe\n",
     "metrics.enabled (line 5)", "valid boolean"),
    # unknown keys, in a camera and at the top
    ("cameras:\n  - name: a\n    uri: x.mp4\n    pasword: x\n", "cameras[0].pasword (line 4)",
     "Extra inputs are not permitted"),
    ("cameras:\n  - name: a\n    uri: x.mp4\ndetector: {}\n", "detector (line 4)",
     "Extra inputs are not permitted"),
    # duplicate camera names
    ("cameras:\n  - name: door\n    uri: a.mp4\n  - name: door\n    uri: b.mp4\n",
     "cameras[1].name (line 4)", "duplicate camera name"),
    # events leaving the host unencrypted
    ("cameras:\n  - name: a\n    uri: x.mp4\npublish:\n  endpoint: tcp://0.0.0.0:5570\n",
     "publish.curve_secret_key_file (line 4)", "reachable from other hosts"),
])
def test_validate_config_cli_names_the_key(tmp_path, text, where, needle):
    path = write(tmp_path, text)
    result = validate_cli(path)
    assert result.returncode == 78 and "Traceback" not in result.stderr   # EX_CONFIG, as `run`
    assert f"{path}: {where}: " in result.stderr and needle in result.stderr, result.stderr


@pytest.mark.parametrize("fault, needle", [
    ("missing", "models.embedder: file not found: {bad} (expected the face embedder ONNX model"),
    ("garbage", "models.embedder: face embedder {bad} is not a loadable ONNX model"),
    ("detector", "models.embedder: face embedder {bad}: "),
])
def test_validate_config_refuses_what_the_daemon_refuses(tmp_path, fault, needle):
    """Issue 13, item 1: validate-config said OK (status 0, a warning) with a model file
    missing, and the service then failed. Now a missing or unloadable model is an error, with
    the status `run` gives it (78), loaded as the stage would load it."""
    bad = tmp_path / "models" / "embedder.onnx"
    if fault != "missing":
        bad.parent.mkdir()
        if fault == "garbage":
            bad.write_bytes(os.urandom(2048))
        else:   # a real ONNX model of the wrong kind
            bad.write_bytes((REPO / "models" / "face_landmarks.onnx").read_bytes())
    path = write(tmp_path, "cameras:\n  - name: a\n    uri: x.mp4\nmodels:\n"
                           "  embedder: models/embedder.onnx\n")
    result = validate_cli(path)
    assert result.returncode == 78, result.stderr
    assert needle.format(bad=bad) in result.stderr and "Traceback" not in result.stderr
    assert not result.stdout.startswith("OK")


def test_duplicate_camera_names_are_rejected(tmp_path):
    path = write(tmp_path, "cameras:\n  - name: door\n    uri: a.mp4\n  - name: door\n    uri: b.mp4\n")
    with pytest.raises(ConfigError, match=r"cameras\[1\]\.name \(line 4\): duplicate camera name"):
        load_config(path)


def test_duplicate_yaml_keys_are_rejected(tmp_path):
    path = write(tmp_path, "cameras:\n  - name: a\n    uri: a.mp4\ndetect:\n  batch_max: 2\n"
                           "  batch_max: 3\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'batch_max' \(line 6\)"):
        load_config(path)


def test_no_cameras_and_bad_names(tmp_path):
    with pytest.raises(ConfigError, match="cameras: Field required"):
        load_config(write(tmp_path, "detect: {}\n"))
    with pytest.raises(ConfigError, match=r"cameras\[0\]\.name"):
        load_config(write(tmp_path, "cameras:\n  - name: 'front door'\n    uri: a.mp4\n"))


def test_rtsp_password_never_in_errors(tmp_path):
    path = write(tmp_path, "cameras:\n  - name: a\n    uri: rtsp://admin:hunter2@10.0.0.5/s1\n"
                           "    loop: true\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert "cameras[0].loop" in str(exc.value) and "video files only" in str(exc.value)
    # the whole camera entry can appear in an error: the password must not
    with pytest.raises(ConfigError) as exc2:
        parse_config({"cameras": [{"name": "a", "uri": "rtsp://admin:hunter2@h/s", "bad": 1}],
                      "detect": {"batch_max": [{"uri": "rtsp://u:hunter2@h"}]}}, tmp_path)
    for text in (str(exc.value), str(exc2.value)):
        assert "hunter2" not in text


@pytest.mark.parametrize("uri,safe", [
    ("rtsp://admin:secret@10.0.0.1:554/s1", "rtsp://admin:***@10.0.0.1:554/s1"),
    ("rtsp://admin:p@ss/w0rd@cam.local/live", "rtsp://admin:***@cam.local/live"),
    ("rtsp://cam.local/live", "rtsp://cam.local/live"),
    ("rtsp://onlyuser@cam.local/live", "rtsp://onlyuser@cam.local/live"),
    ("http://cam/mjpg?user=a&password=zz&x=1", "http://cam/mjpg?user=a&password=***&x=1"),
    ("/dev/video0", "/dev/video0"),
])
def test_redact_uri(uri, safe):
    assert redact_uri(uri) == safe


def test_env_references_expand_only_when_opened(tmp_path, monkeypatch):
    monkeypatch.delenv("FW_TEST_PW", raising=False)
    cfg = parse_config({"cameras": [{"name": "a", "uri": "rtsp://u:${FW_TEST_PW}@h/s"}]}, tmp_path)
    with pytest.raises(ConfigError, match="FW_TEST_PW is not set"):
        cfg.cameras[0].open_uri()
    monkeypatch.setenv("FW_TEST_PW", "s3cret")
    assert cfg.cameras[0].open_uri() == "rtsp://u:s3cret@h/s"
    assert "s3cret" not in config_to_json(cfg) and "s3cret" not in cfg.cameras[0].safe_uri


def test_paths_relative_to_config_and_cli_overrides_relative_to_cwd(tmp_path, monkeypatch):
    sub = tmp_path / "etc"
    sub.mkdir()
    path = write(sub, "cameras:\n  - name: a\n    uri: clips/a.mp4\n  - name: cam\n"
                      "    uri: /dev/video2\n")
    cfg = load_config(path)
    assert cfg.cameras[0].uri == str(sub / "clips" / "a.mp4") and cfg.cameras[0].kind == "file"
    assert cfg.cameras[1].kind == "device" and cfg.cameras[1].uri == "/dev/video2"
    # no model named: the shipped ones, wherever the config file is (issue 13, item 1)
    from facewatch.stages.model_files import models_dir
    assert cfg.models.detector == models_dir() / "face_detector.onnx" and cfg.models.detector.is_file()
    assert cfg.models.embedder.is_file() and cfg.models.landmarks.is_file()
    named = write(sub, "cameras:\n  - name: a\n    uri: a.mp4\nmodels:\n  detector: m/d.onnx\n")
    assert load_config(named).models.detector == sub / "m" / "d.onnx"   # named: relative to it
    assert cfg.gallery.path == sub / "gallery.db"
    monkeypatch.chdir(tmp_path)
    cfg = load_config(path, cameras=[parse_camera_arg("x=v.mp4"), parse_camera_arg("y=rtsp://h/s")],
                      gallery="g.db", event_log="logs/e.jsonl")
    assert [c.name for c in cfg.cameras] == ["x", "y"]
    assert cfg.cameras[0].uri == str(tmp_path / "v.mp4") and cfg.cameras[1].kind == "stream"
    assert cfg.gallery.path == tmp_path / "g.db"
    assert cfg.publish.event_log == tmp_path / "logs" / "e.jsonl"
    with pytest.raises(ValueError, match="NAME=URI"):
        parse_camera_arg("novalue")


def test_file_only_options_and_roi(tmp_path):
    with pytest.raises(ConfigError, match=r"cameras\[0\]\.realtime.*video files only"):
        parse_config({"cameras": [{"name": "a", "uri": "/dev/video0", "realtime": False}]}, tmp_path)
    with pytest.raises(ConfigError, match=r"cameras\[0\]\.roi"):
        parse_config({"cameras": [{"name": "a", "uri": "a.mp4", "roi": [10, 10, 5, 20]}]}, tmp_path)
    cfg = parse_config({"cameras": [{"name": "a", "uri": "a.mp4", "loop": True,
                                     "roi": [0, 0, 100, 50]}]}, tmp_path)
    assert cfg.cameras[0].roi == (0, 0, 100, 50)


def test_effective_config_round_trip_and_runtime_dir(tmp_path, monkeypatch):
    cfg = parse_config({"cameras": [{"name": "a", "uri": "a.mp4"}]}, tmp_path)
    assert config_from_json(config_to_json(cfg)) == cfg
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path / "run"))
    assert with_runtime_dir(cfg).runtime.dir == tmp_path / "run"
    monkeypatch.delenv("RUNTIME_DIRECTORY")
    with pytest.raises(ConfigError, match="runtime.dir"):
        with_runtime_dir(cfg)
    assert with_runtime_dir(cfg, tmp_path / "x").runtime.dir == tmp_path / "x"


def test_endpoints(tmp_path):
    ipc = Endpoints.for_runtime("ipc", Path("/run/facewatch"))
    assert ipc.frames == "ipc:///run/facewatch/frames.sock" and ipc.input_of("detect") == ipc.frames
    tcp = Endpoints.for_runtime("tcp", None, "10.0.0.2", 6000)
    assert (tcp.frames, tcp.decisions, tcp.control) == ("tcp://10.0.0.2:6000",
                                                        "tcp://10.0.0.2:6003", None)
    assert Endpoints.for_runtime("tcp", Path("/run/fw"), "h", 1).control == "ipc:///run/fw/control.sock"
    assert tcp.output_of("embed") == tcp.embeddings and tcp.output_of("publish") is None
    with pytest.raises(ValueError, match="too long"):
        Endpoints.for_runtime("ipc", Path("/" + "x" * 120))


def test_a_null_landmark_model_for_an_aligning_embedder_is_warned(tmp_path):
    """The shipped embedder aligns on five points: without a landmark model every face would get
    the fallback crop, so validate-config says so (and still accepts the file)."""
    embedder = REPO / "models" / "face_embedder.onnx"
    if not embedder.is_file():
        pytest.skip("models/face_embedder.onnx not built")
    path = write(tmp_path, f"cameras: [{{name: a, uri: /dev/null}}]\n"
                           f"models: {{embedder: {embedder}, landmarks: null}}\n")
    result = validate_cli(path)
    assert result.returncode == 0, result.stderr
    assert "models.landmarks is null but the embedder aligns" in result.stderr
    path = write(tmp_path, f"cameras: [{{name: a, uri: /dev/null}}]\n"
                           f"models: {{embedder: {embedder}, landmarks: {REPO / 'models' / 'face_landmarks.onnx'}}}\n")
    assert "models.landmarks" not in validate_cli(path).stderr
