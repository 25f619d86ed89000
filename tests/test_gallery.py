"""The SQLite gallery: real files, real subprocesses, real SIGKILLs."""
from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from facewatch.stages.gallery import (APPLICATION_ID, Gallery, GalleryError, GallerySnapshot, SCHEMA_VERSION,
                            file_model_id)

ROOT = Path(__file__).resolve().parent.parent


def vectors(seed: int, k: int = 3, d: int = 16) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(k, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "facewatch.daemon.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_new_gallery_is_private(tmp_path):
    path = tmp_path / "a" / "b" / "gallery.db"
    with Gallery(path) as g:
        g.enroll("ann", vectors(0), "m1", ["x.jpg"] * 3)
    assert mode(tmp_path / "a") == 0o700 and mode(tmp_path / "a" / "b") == 0o700
    for suffix in ("", "-wal", "-shm"):  # SQLite gives its side files the database's mode
        f = Path(f"{path}{suffix}")
        if f.exists():
            assert mode(f) == 0o600, f
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert db.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID


def test_enroll_snapshot_persons_round_trip(tmp_path):
    a, b, a2 = vectors(1, 2), vectors(2, 1), vectors(3, 1)
    with Gallery(tmp_path / "g.db") as g:
        assert len(g.snapshot()) == 0 and g.snapshot().model_id is None
        ann = g.enroll("ann", a, "m1", ["a1.jpg", "a2.jpg"], [50.0, 60.0])
        bob = g.enroll(" bob ", b, "m1", ["b.jpg"])  # surrounding spaces are not part of a name
        assert g.enroll("ann", a2, "m1", ["a3.jpg"]) == ann  # adds to the same person
        snap = g.snapshot()
        people = {p.name: p for p in g.persons()}
    assert isinstance(snap, GallerySnapshot) and snap.model_id == "m1"
    assert snap.names == ["ann", "ann", "bob", "ann"]
    assert snap.person_ids.dtype == np.int64 and snap.person_ids.tolist() == [ann, ann, bob, ann]
    assert snap.embeddings.dtype == np.float32
    np.testing.assert_array_equal(snap.embeddings, np.concatenate([a, b, a2]))
    assert (people["ann"].n_embeddings, people["bob"].n_embeddings) == (3, 1)
    assert people["ann"].id == ann and people["ann"].created <= time.time()


def test_data_version_sees_every_commit(tmp_path):
    path = tmp_path / "g.db"
    with Gallery(path) as g, Gallery(path) as other:
        v0 = g.data_version()
        assert g.data_version() == v0  # stable while nothing changes
        g.enroll("ann", vectors(0), "m1", ["a"] * 3)
        v1 = g.data_version()
        assert v1 != v0  # this connection's own write
        assert other.data_version() != v0
        v_other = other.data_version()
        script = ("import sys, numpy as np; from stages.gallery import Gallery; "
                  "Gallery(sys.argv[1]).enroll('bob', np.ones((1, 16), np.float32), 'm1', ['b'])")
        subprocess.run([sys.executable, "-c", script, str(path)], cwd=ROOT, check=True, timeout=60)
        assert g.data_version() not in (v0, v1)  # another process's write
        assert other.data_version() != v_other
        v2 = g.data_version()
        assert g.remove("bob") == 1 and g.data_version() != v2
        v3 = g.data_version()
        assert g.remove("nobody") == 0 and g.data_version() == v3  # nothing changed
        assert g.snapshot().version == v3


def test_refuses_other_model_or_dimension(tmp_path):
    with Gallery(tmp_path / "g.db") as g:
        g.enroll("ann", vectors(0, d=16), "m1", ["a"] * 3)
        before = g.data_version()
        with pytest.raises(GalleryError, match=r"model m1 \(dimension 16\).*model m2"):
            g.enroll("bob", vectors(1, d=16), "m2", ["b"] * 3)
        with pytest.raises(GalleryError, match=r"dimension 16\).*dimension 8"):
            g.enroll("ann", vectors(1, d=8), "m1", ["b"] * 3)
        assert g.data_version() == before and [p.name for p in g.persons()] == ["ann"]


@pytest.mark.parametrize("name, emb, sources, message", [
    ("", vectors(0), ["a"] * 3, "non-empty"),
    ("ann\nbob", vectors(0), ["a"] * 3, "control characters"),
    ("x" * 201, vectors(0), ["a"] * 3, "longer than 200"),
    ("ann", vectors(0)[0], ["a"], r"shape \(K, D\)"),
    ("ann", np.zeros((0, 16), np.float32), [], r"shape \(K, D\)"),
    ("ann", np.full((1, 16), np.nan, np.float32), ["a"], "NaN"),
    ("ann", vectors(0), ["a"], "one entry per embedding"),
])
def test_enroll_rejects_bad_arguments(tmp_path, name, emb, sources, message):
    with Gallery(tmp_path / "g.db") as g:
        with pytest.raises(GalleryError, match=message):
            g.enroll(name, emb, "m1", sources)
        assert g.persons() == []


def test_remove_cascades(tmp_path):
    with Gallery(tmp_path / "g.db") as g:
        g.enroll("ann", vectors(0), "m1", ["a"] * 3)
        g.enroll("bob", vectors(1, 2), "m1", ["b"] * 2)
        assert g.remove("ann") == 1
        assert g.snapshot().names == ["bob", "bob"]
        assert g.integrity_check() == ["ok"]
    rows = sqlite3.connect(tmp_path / "g.db").execute("SELECT count(*) FROM embeddings").fetchone()
    assert rows[0] == 2  # ann's embeddings went with her


def test_export_round_trip(tmp_path):
    a = vectors(5, 2)
    out = tmp_path / "export.json"
    with Gallery(tmp_path / "g.db") as g:
        g.enroll("ann", a, "m1", ["a1.jpg", "a2.jpg"], [40.0, 41.0])
        assert g.export(out) == 1
    assert mode(out) == 0o600  # biometric data
    doc = json.loads(out.read_text())
    assert (doc["format"], doc["model_id"], doc["dim"]) == ("facewatch-gallery", "m1", 16)
    (person,) = doc["persons"]
    assert person["name"] == "ann" and [e["source"] for e in person["embeddings"]] == ["a1.jpg", "a2.jpg"]
    np.testing.assert_array_equal(np.array([e["vector"] for e in person["embeddings"]], np.float32), a)


def test_not_a_gallery_is_refused_and_left_alone(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("my shopping list\n")
    other_app = tmp_path / "other.sqlite"
    db = sqlite3.connect(other_app)
    db.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
    db.commit()
    db.close()
    corrupt = tmp_path / "corrupt.db"
    with Gallery(corrupt) as g:
        g.enroll("ann", vectors(0), "m1", ["a"] * 3)
    data = bytearray(corrupt.read_bytes())
    data[100:4096] = os.urandom(4096 - 100)  # keep the magic, destroy the first page
    corrupt.write_bytes(bytes(data))
    for wal in tmp_path.glob("corrupt.db-*"):
        wal.unlink()
    for path in (text, other_app, corrupt):
        before = path.read_bytes()
        with pytest.raises(GalleryError, match=f"not a facewatch gallery: {path}"):
            Gallery(path)
        assert path.read_bytes() == before
    with pytest.raises(GalleryError, match="not a regular file"):
        Gallery(tmp_path)


def test_missing_gallery_is_not_created_when_reading(tmp_path):
    with pytest.raises(FileNotFoundError, match="gallery not found"):
        Gallery(tmp_path / "nope.db", create=False)
    assert not (tmp_path / "nope.db").exists()


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "g.db"
    Gallery(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(GalleryError, match="newer than this facewatch supports"):
        Gallery(path)


def test_file_model_id(tmp_path):
    (tmp_path / "a.onnx").write_bytes(b"model a")
    (tmp_path / "b.onnx").write_bytes(b"model b")
    ids = {file_model_id(tmp_path / n) for n in ("a.onnx", "b.onnx", "a.onnx")}
    assert len(ids) == 2 and all(len(i) == 16 for i in ids)


# A writer that enrolls person i with K vectors derived from i, printing i once committed.
WRITER = """
import sys, numpy as np
from facewatch.stages.gallery import Gallery
K, D = int(sys.argv[2]), int(sys.argv[3])
print("opening", flush=True)
g = Gallery(sys.argv[1])
i = 1 + max([int(p.name[1:]) for p in g.persons()], default=-1)
while True:
    v = np.random.default_rng(i).normal(size=(K, D)).astype(np.float32)
    g.enroll(f"p{i:05d}", v, "m1", [f"{i}-{k}.jpg" for k in range(K)])
    print(i, flush=True)
    i += 1
"""


def test_sigkill_mid_enrollment_never_corrupts(tmp_path):
    """SIGKILL a writer at random moments (during open, between and inside transactions)."""
    path, k, d = tmp_path / "g.db", 20, 512
    rng = random.Random(1234)
    committed: set[int] = set()
    for _ in range(12):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(k), str(d)],
                                cwd=ROOT, stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "opening"
        time.sleep(rng.uniform(0.0, 0.25))  # the kill time is the random variable here
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL
        committed |= {int(line) for line in out.split()}
    assert len(committed) >= 5, "the writer never got going: the test proved nothing"
    with Gallery(path, create=False) as g:
        assert g.integrity_check() == ["ok"]
        people = {p.name: p.n_embeddings for p in g.persons()}
        snap = g.snapshot()
    # Every reported commit is there; nothing is partial (committed but unreported is fine).
    assert {f"p{i:05d}" for i in committed} <= set(people)
    assert set(people.values()) == {k}
    for name in people:
        i = int(name[1:])
        rows = snap.embeddings[[n == name for n in snap.names]]
        expected = np.random.default_rng(i).normal(size=(k, d)).astype(np.float32)
        np.testing.assert_array_equal(rows, expected)


def test_concurrent_writers_wait_for_each_other(tmp_path):
    path = tmp_path / "g.db"
    Gallery(path).close()
    script = ("import sys, numpy as np; from stages.gallery import Gallery\n"
              "g = Gallery(sys.argv[1])\n"
              "for i in range(30):\n"
              "    g.enroll(f'{sys.argv[2]}{i}', np.ones((2, 64), np.float32), 'm', ['a', 'b'])")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(path), prefix], cwd=ROOT)
             for prefix in ("x", "y")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    with Gallery(path) as g:
        assert len(g.persons()) == 60 and len(g.snapshot()) == 120


# --- `facewatch gallery` -------------------------------------------------------------------

def test_gallery_commands(tmp_path):
    path = tmp_path / "g.db"
    with Gallery(path) as g:
        g.enroll("ann", vectors(0), "m1", ["a"] * 3)
        g.enroll("bob", vectors(1, 1), "m1", ["b"])
    r = cli("gallery", "list", "--gallery", str(path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "2 people, 4 embeddings, model m1, dimension 16"
    assert "ann" in r.stdout and "bob" in r.stdout
    r = cli("gallery", "--gallery", str(path), "list", "--json")  # --gallery before the action
    assert [json.loads(line)["name"] for line in r.stdout.splitlines()] == ["ann", "bob"]
    r = cli("gallery", "export", "--gallery", str(path))
    assert r.returncode == 0 and len(json.loads(r.stdout)["persons"]) == 2
    r = cli("gallery", "remove", "ann", "--gallery", str(path))
    assert r.returncode == 0 and "removed ann (3 embeddings)" in r.stdout
    r = cli("gallery", "remove", "ann", "--gallery", str(path))
    assert r.returncode == 2 and "no person named 'ann'" in r.stderr
    r = cli("gallery", "check", "--gallery", str(path))
    assert (r.returncode, r.stdout.strip()) == (0, "ok")
    out = tmp_path / "out.json"
    r = cli("gallery", "export", "--gallery", str(path), "--out", str(out))
    assert r.returncode == 0 and [p["name"] for p in json.loads(out.read_text())["persons"]] == ["bob"]


@pytest.mark.parametrize("setup, message", [
    ("missing", "gallery not found"),
    ("text", "not a facewatch gallery"),
])
def test_gallery_command_errors(tmp_path, setup, message):
    path = tmp_path / "g.db"
    if setup == "text":
        path.write_text("hello")
    r = cli("gallery", "list", "--gallery", str(path))
    assert r.returncode == 2 and message in r.stderr and str(path) in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1  # one clear line, no traceback
    assert path.exists() == (setup == "text")
