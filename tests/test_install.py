"""The package as an operator installs it (issue 13, items 1 and 8): the wheel, a fresh venv with
the runtime and CPU extras only (from the package registry), the config copied to another
folder, then the README's service steps: validate-config, enroll --config, run a file camera
until its events are written. Nothing of the source checkout is on the path there.

Slow (~1-2 minutes on 2 cores with pip's cache warm): it builds and installs a real wheel.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from conftest import REPO, free_port, read_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

RUNTIME_LIMIT_BYTES = 1 << 30   # a fresh venv with the runtime and CPU extras: under 1 GB


def sh(cmd: list[str], cwd: Path, timeout: float = 600, env: dict | None = None,
       check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in (env or os.environ).items()
           if k not in ("PYTHONPATH", "FACEWATCH_MODELS", "VIRTUAL_ENV")}
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True,
                       timeout=timeout, env=env)
    if check:
        assert r.returncode == 0, f"{cmd}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A venv made from scratch with `pip install 'facewatch-*.whl[cpu]'`."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"   # the checkout's files (tracked or not ignored), so the build leaves no trace
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=REPO, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    wheels = tmp / "wheels"
    # the build backend of this venv when it has one (no download), else pip's isolated build
    isolation = ["--no-build-isolation"] if _has_setuptools() else []
    sh([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", wheels, src],
       cwd=tmp)
    (wheel,) = wheels.glob("facewatch-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if n.endswith(".py")}
    assert tops == {"facewatch"}, f"top-level modules besides facewatch: {sorted(tops)}"
    for model in ("face_detector.onnx", "face_embedder.onnx", "face_landmarks.onnx"):
        assert any(n.endswith(f".data/data/share/facewatch/models/{model}") for n in names), names
    venv = tmp / "venv"
    sh([sys.executable, "-m", "venv", venv], cwd=tmp)
    sh([venv / "bin" / "pip", "install", "-q", f"{wheel}[cpu]"], cwd=tmp, timeout=800)
    return venv


def _has_setuptools() -> bool:
    try:
        import setuptools
    except ImportError:
        return False
    return int(setuptools.__version__.split(".")[0]) >= 68   # pyproject.toml's build requirement


def test_runtime_install_is_lean(installed):
    py = installed / "bin" / "python"
    probe = sh([py, "-c", "import importlib.util as u, json; print(json.dumps([m for m in "
                "('torch', 'tensorflow', 'keras', 'ultralytics', 'tf2onnx', 'dlib') "
                "if u.find_spec(m)]))"], cwd=installed)
    assert json.loads(probe.stdout) == [], probe.stdout
    # Our modules live under one namespace: nothing of ours may shadow another distribution's
    # module (`daemon` is python-daemon's).
    ours = sh([py, "-c", "import importlib.util as u, json; print(json.dumps([m for m in "
               "('daemon', 'stages', 'export', 'training') if u.find_spec(m)]))"], cwd=installed)
    assert json.loads(ours.stdout) == [], ours.stdout
    sh([py, "-c", "import facewatch.stages.gallery, facewatch.daemon.cli"], cwd=installed)
    size = sum(f.stat().st_size for f in installed.rglob("*") if f.is_file() and not f.is_symlink())
    assert size < RUNTIME_LIMIT_BYTES, f"{size / 2**20:.0f} MiB"
    cv2 = sh([py, "-c", "import cv2, importlib.metadata as m; print(cv2.__file__); "
              "print([d.metadata['Name'] for d in m.distributions() "
              "if d.metadata['Name'].startswith('opencv')])"], cwd=installed)
    assert "['opencv-python-headless']" in cv2.stdout, cv2.stdout   # no second cv2 beside it


def test_service_steps_from_the_installed_package(installed, tmp_path, knn_dir, short_video):
    """README "As a systemd service", in folders of its own: the config copied elsewhere (it
    names no model: the shipped ones are found), validated, a person enrolled with --config,
    the daemon run on a file camera from yet another working directory, events written."""
    fw = installed / "bin" / "facewatch"
    etc, var, work = tmp_path / "etc" / "facewatch", tmp_path / "var" / "lib", tmp_path / "work"
    for d in (etc, var, work):
        d.mkdir(parents=True)
    shipped = yaml.safe_load((REPO / "config.yaml").read_text())
    cfg = dict(shipped)
    cfg["cameras"] = [{"name": "lobby", "uri": str(short_video.path), "realtime": False}]
    cfg["publish"] = dict(shipped["publish"], endpoint=f"tcp://127.0.0.1:{free_port()}",
                          event_log=str(var / "events.jsonl"))
    cfg["metrics"] = dict(shipped.get("metrics", {}), port=free_port())
    cfg["gallery"] = dict(shipped.get("gallery", {}), path=str(var / "gallery.db"))
    cfg["models"] = dict(shipped["models"], providers=["CPUExecutionProvider"])
    assert not {"detector", "embedder", "landmarks"} & set(cfg["models"])
    config = etc / "config.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))

    r = sh([fw, "validate-config", config], cwd=work)
    assert r.stdout.startswith("OK"), r.stdout + r.stderr
    photos = sorted((knn_dir / "train" / "obama").glob("*.jp*g"))
    r = sh([fw, "enroll", "--config", config, "--cpu", "--name", "obama", *photos], cwd=work)
    assert f"gallery {var / 'gallery.db'}" in r.stdout, r.stdout
    r = sh([fw, "gallery", "--config", config, "list", "--json"], cwd=work)
    assert [json.loads(line)["name"] for line in r.stdout.splitlines()] == ["obama"]
    run = sh([fw, "run", "--config", config], cwd=work, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    events = read_jsonl(var / "events.jsonl")
    assert any(e["type"] == "recognized" and e["name"] == "obama" for e in events), events
    assert "Traceback" not in run.stderr
