"""The command line as an operator meets it (issue 13, items 4 and 7): quick and quiet help with
text for every option, a description written for operators, no traceback when the reader of
stdout goes away, gallery and enroll commands that take the daemon's config, exit statuses."""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, write_config
from facewatch.daemon import cli
from facewatch.stages import errors


def run_cli(*args: str, cwd: Path = REPO, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "facewatch.daemon.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO)}, **kw)


def test_every_help_is_quick_quiet_and_imports_no_training_framework():
    """Four helps took 4 s and printed TensorFlow's banner. Each command's help is built the way
    `facewatch CMD --help` builds it, in one fresh process that then reports what got imported."""
    script = (
        "import sys, time, json\n"
        "from daemon import cli\n"
        "times = {}\n"
        "for name in cli.COMMANDS:\n"
        "    t = time.perf_counter()\n"
        "    try:\n"
        "        cli.main([name, '--help'])\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, (name, e.code)\n"
        "    times[name] = time.perf_counter() - t\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'tensorflow', 'keras', 'torch', "
        "'torchvision', 'ultralytics', 'tf2onnx', 'dlib'})\n"
        "print(json.dumps({'times': times, 'heavy': heavy}), file=sys.stderr)\n")
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    report = json.loads(r.stderr.strip().splitlines()[-1])
    noise = r.stderr.strip().splitlines()[:-1]
    assert r.returncode == 0 and noise == [], "\n".join(noise)[-3000:]
    assert report["heavy"] == [], report
    assert max(report["times"].values()) < 3.0, report["times"]   # was 10 s for train-embedder
    for name in ("train-embedder", "evaluate-embedder", "teacher-cache", "train-landmarks"):
        started = time.monotonic()
        r = run_cli(name, "--help")
        assert r.returncode == 0 and r.stderr == "" and "usage: facewatch" in r.stdout, r.stderr
        assert time.monotonic() - started < 5.0


def _options_without_help(parser: argparse.ArgumentParser, path: str) -> list[str]:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += _options_without_help(sub, f"{path} {name}")
        elif not action.help or action.help == argparse.SUPPRESS:
            out.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
    return out


def test_every_option_has_help_text():
    missing = []
    for name in cli.COMMANDS:
        parser = cli.build_parser(name, for_help=True)
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        missing += _options_without_help(sub.choices[name], f"facewatch {name}")
    assert missing == [], missing


def test_top_level_help_is_written_for_operators():
    r = run_cli("--help")
    assert r.returncode == 0 and r.stderr == ""
    text = r.stdout
    for needle in ("recognises enrolled people", "validate-config", "enroll --config",
                   "models ship with the package", "exit statuses:", "78 unusable configuration"):
        assert needle in text, (needle, text)
    description = text.split("positional arguments")[0]
    assert "ConvNeXt" not in description and "ZeroMQ" in description


def test_exit_status_table_matches_the_readme_and_the_unit():
    """One table: README's "Exit statuses", the constants, the unit's RestartPreventExitStatus."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("### Exit statuses", 1)[1].split("\n#", 1)[0]
    rows = re.findall(r"^\| (\d+) \| ", section, re.M)
    constants = {int(v): k for k, v in vars(errors).items() if k.startswith("EXIT_")}
    assert sorted(int(k) for k in rows) == sorted(constants), (rows, constants)
    unit = (REPO / "systemd" / "facewatch.service").read_text()
    prevent = re.search(r"^RestartPreventExitStatus=(.*)$", unit, re.M)[1].split()
    assert prevent == [str(errors.EXIT_SETUP)]
    assert "validate-config" not in re.findall(r"^ExecStartPre=.*$", unit, re.M).__str__(), \
        "a failing ExecStartPre is restarted whatever its status: run itself validates"


@pytest.fixture
def big_gallery(tmp_path) -> Path:
    from facewatch.stages.gallery import Gallery

    rng = np.random.default_rng(0)
    path = tmp_path / "g.db"
    with Gallery(path) as g:
        for i in range(300):   # far more JSON than a pipe holds
            g.enroll(f"person_{i:03d}", rng.normal(size=(2, 128)).astype(np.float32), "m1",
                     ["a.jpg", "b.jpg"], [50.0, 60.0])
    return path


def test_export_into_a_closed_pipe_ends_quietly(big_gallery):
    """`facewatch gallery export | head -c 100`: a BrokenPipeError traceback before."""
    proc = subprocess.Popen([sys.executable, "-m", "facewatch.daemon.cli", "gallery", "--gallery",
                             str(big_gallery), "export"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
    head = proc.stdout.read(100)
    proc.stdout.close()           # the reader goes away, as `head` does
    err = proc.stderr.read().decode()
    code = proc.wait(60)
    assert head.startswith(b"{") or head.startswith(b"[")
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert code == errors.EXIT_PIPE == 141


def test_gallery_and_enroll_use_the_configs_gallery_path_and_models(tmp_path, big_gallery):
    """Issue 13, item 7: gallery commands ignored the config's gallery.path; enroll had no
    --config and used the repository's models."""
    folder = tmp_path / "etc"
    folder.mkdir()
    config = write_config(folder / "config.yaml", [{"name": "a", "uri": "a.mp4"}],
                          gallery={"path": str(big_gallery)})
    r = run_cli("gallery", "--config", str(config), "list", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 300
    r = run_cli("gallery", "list", "--config", str(config), cwd=tmp_path)   # after the action too
    assert r.returncode == 0 and r.stdout.startswith("300 people"), r.stderr
    r = run_cli("gallery", "list", cwd=tmp_path)
    assert r.returncode == 2 and "--config CONFIG (its gallery.path) or --gallery PATH" in r.stderr
    # enroll --config: the config's embedder is the one loaded (here one that is not there)
    missing = folder / "models" / "other_embedder.onnx"
    config = write_config(folder / "config.yaml", [{"name": "a", "uri": "a.mp4"}],
                          models={"embedder": str(missing)},
                          gallery={"path": "people.db"})
    r = run_cli("enroll", "--config", str(config), "--cpu", "--name", "ann", str(tmp_path / "x.jpg"),
                cwd=tmp_path)
    assert r.returncode == errors.EXIT_SETUP and f"face embedder file not found: {missing}" in r.stderr
    assert not (folder / "people.db").exists()


def test_the_supervisor_process_stays_light(tmp_path):
    """`facewatch run` is the supervisor: its checks read the models' metadata without OpenCV,
    onnxruntime, the onnx package or scipy (each tens of MB of RSS in a process that runs for
    the daemon's whole life; issue 13, item 8)."""
    config = write_config(tmp_path / "config.yaml", [{"name": "a", "uri": "a.mp4"}])
    script = ("import sys\n"
              "from daemon.config import load_config, problems\n"
              "from daemon.run_command import check_required_files\n"
              "import daemon.supervisor\n"
              f"cfg = load_config({str(config)!r})\n"
              "check_required_files(cfg)\n"
              "problems(cfg)\n"
              "print(sorted({m.split('.')[0] for m in sys.modules} & {'cv2', 'onnxruntime', "
              "'onnx', 'scipy', 'torch', 'tensorflow', 'supervision'}))\n")
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout
