"""The face gallery: enrolled people and their embeddings in one SQLite file.

Durability: every write is one transaction, the journal is a WAL and synchronous=FULL, so killing
a process mid-enrollment leaves either the whole enrollment or none of it. The daemon polls
`data_version()` (cheap) and reloads `snapshot()` when it changes, so `facewatch enroll` in
another process takes effect without a restart.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Sequence

import numpy as np

log = logging.getLogger("facewatch.gallery")

SCHEMA_VERSION = 1
APPLICATION_ID = 0x46574731  # "FWG1" in the SQLite header: marks the file as a facewatch gallery
BUSY_TIMEOUT_S = 10.0  # another process (enroll vs daemon) may hold the write lock briefly
MAX_NAME_LENGTH = 200
SQLITE_MAGIC = b"SQLite format 3\x00"
WAL_SUFFIXES = ("-wal", "-shm")   # SQLite's files beside a WAL-mode database
VECTOR_DTYPE = np.dtype("<f4")  # stored little-endian whatever the host, so files are portable

_SCHEMA_V1 = """
CREATE TABLE persons (
    id INTEGER PRIMARY KEY,
    name TEXT UNIQUE NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE embeddings (
    id INTEGER PRIMARY KEY,
    person_id INTEGER NOT NULL REFERENCES persons(id) ON DELETE CASCADE,
    vector BLOB NOT NULL,
    dim INTEGER NOT NULL CHECK (dim > 0 AND length(vector) = 4 * dim),
    model_id TEXT NOT NULL,
    source TEXT,
    quality REAL,
    created REAL NOT NULL
);
CREATE INDEX embeddings_person ON embeddings(person_id);
-- One row, bumped by every write transaction: PRAGMA data_version misses this connection's writes.
CREATE TABLE generation (id INTEGER PRIMARY KEY CHECK (id = 1), value INTEGER NOT NULL);
INSERT INTO generation VALUES (1, 0);
"""
# user_version N -> script that brings the schema to N + 1.
_MIGRATIONS: dict[int, str] = {0: _SCHEMA_V1}


class GalleryError(ValueError):
    """A gallery that cannot be used or a write it refuses; the message names the file."""


@dataclass(frozen=True)
class PersonInfo:
    id: int
    name: str
    n_embeddings: int
    created: float  # unix time


@dataclass(frozen=True)
class GallerySnapshot:
    """Every embedding as one matrix row; the recognizer matches against `embeddings`."""
    person_ids: np.ndarray  # (M,) int64
    names: list[str]        # (M,) the person's name for each row
    embeddings: np.ndarray  # (M, D) float32
    model_id: str | None    # None when the gallery is empty
    version: int            # data_version() at the time of the snapshot

    def __post_init__(self) -> None:
        m = len(self.names)
        if self.person_ids.shape != (m,) or self.person_ids.dtype != np.int64:
            raise ValueError(f"person_ids must be int64 of shape ({m},), got "
                             f"{self.person_ids.dtype} {self.person_ids.shape}")
        if self.embeddings.ndim != 2 or len(self.embeddings) != m or self.embeddings.dtype != np.float32:
            raise ValueError(f"embeddings must be float32 of shape ({m}, D), got "
                             f"{self.embeddings.dtype} {self.embeddings.shape}")

    def __len__(self) -> int:
        return len(self.names)


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, read in 1 MB blocks (model files are tens of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_model_id(model_path: str | os.PathLike) -> str:
    """Identity of an embedder file: embeddings of different files are never compared."""
    return file_sha256(model_path)[:16]


def _create_private(path: Path) -> None:
    """Create missing parent folders (0700) and an empty file (0600): embeddings are biometric data."""
    missing = [p for p in reversed(path.parents) if not p.exists()]
    for folder in missing:
        folder.mkdir(mode=0o700, exist_ok=True)
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:  # another process created it first: fine, it is checked below
        return
    # A new, empty file: a -wal / -shm left at its path belong to a deleted gallery and SQLite
    # would pair them with this one (reading the old pages): remove them first.
    for suffix in WAL_SUFFIXES:
        try:
            os.unlink(f"{path}{suffix}")
            log.warning("removed %s%s, left behind by a deleted gallery", path, suffix)
        except FileNotFoundError:
            pass


def _make_private(path: Path) -> None:
    """An existing gallery we own gets mode 0600 (embeddings are biometric data; a 0444 or 0644
    file is also read-only or readable by others). Its WAL files follow SQLite's copy of it."""
    for name in [path] + [Path(f"{path}{s}") for s in WAL_SUFFIXES]:
        try:
            st = os.stat(name)
            if st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) == 0o600:
                continue
            os.chmod(name, 0o600)
        except FileNotFoundError:
            continue
        except OSError as exc:   # e.g. a read-only file system: _check_writable says so
            log.debug("cannot chmod %s: %s", name, exc)
            continue
        log.warning("%s had mode %04o; set to 0600 (owner-only: face embeddings)", name,
                    stat.S_IMODE(st.st_mode))


def _check_writable(path: Path) -> None:
    """The daemon and enroll both write the gallery (WAL journal, schema): a read-only file or
    folder is named as such instead of failing later as 'attempt to write a readonly database'."""
    for target, what in ((path, "file"), (path.parent, "folder")):
        if not os.access(target, os.W_OK):
            reason = ("on a read-only file system" if _read_only_fs(target)
                      else f"not writable by uid {os.geteuid()}")
            raise GalleryError(f"gallery {path} is read-only: its {what} {target} is {reason}; "
                               f"facewatch writes the gallery and its -wal/-shm files next to it "
                               f"(give the service user write access, e.g. keep it in "
                               f"/var/lib/facewatch)")


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _check_header(path: Path) -> None:
    """Refuse a file that is not SQLite before SQLite gets a chance to write to it."""
    if not path.is_file():
        raise GalleryError(f"not a facewatch gallery: {path} (not a regular file)")
    with open(path, "rb") as f:
        head = f.read(len(SQLITE_MAGIC))
    if head and head != SQLITE_MAGIC:  # an empty file is a new database
        raise GalleryError(f"not a facewatch gallery: {path} (not an SQLite database)")


class Gallery:
    """One connection to a gallery file. Use from one thread; open one per process."""

    def __init__(self, path: str | os.PathLike, create: bool = True):
        self.path = Path(path)
        if not self.path.exists():
            if not create:
                raise FileNotFoundError(f"gallery not found: {self.path}")
            _create_private(self.path)
        _check_header(self.path)
        _make_private(self.path)
        _check_writable(self.path)
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE), never implicit.
        self._db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        try:
            self._setup()
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise self._error(exc) from exc
        except BaseException:
            self._db.close()
            raise

    def _error(self, exc: sqlite3.DatabaseError) -> GalleryError:
        text = str(exc)
        if "locked" in text or "busy" in text:
            return GalleryError(f"gallery {self.path} is locked by another process ({text}); "
                                f"retry in a moment")
        if isinstance(exc, sqlite3.IntegrityError):
            return GalleryError(f"gallery {self.path}: write refused ({text})")
        if "readonly" in text or "read-only" in text:
            return GalleryError(f"gallery {self.path} is read-only ({text}); facewatch writes "
                                f"the gallery and its -wal/-shm files next to it")
        return GalleryError(f"not a facewatch gallery: {self.path} ({text})")

    def _setup(self) -> None:
        db = self._db
        db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        self._check_identity()  # read-only, before anything (journal mode included) writes
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":  # e.g. a file system without shared memory: still atomic, but say so
            log.warning("gallery %s: journal mode is %s, not WAL", self.path, mode)
        db.execute("PRAGMA synchronous = FULL")
        db.execute("PRAGMA foreign_keys = ON")
        if self._check_identity() == SCHEMA_VERSION:
            return
        # Migrate under the write lock, re-checking, so two processes opening a new file agree.
        with _Transaction(db, immediate=True, bump=False):
            version = self._check_identity()
            for step in range(version, SCHEMA_VERSION):
                log.info("gallery %s: migrating schema %d -> %d", self.path, step, step + 1)
                for statement in _MIGRATIONS[step].split(";"):
                    if statement.strip():
                        db.execute(statement)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            db.execute(f"PRAGMA application_id = {APPLICATION_ID}")

    def _check_identity(self) -> int:
        """The schema version of a facewatch gallery (0: new, empty file); refuse anything else."""
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        app_id = self._db.execute("PRAGMA application_id").fetchone()[0]
        has_tables = self._db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] > 0
        if app_id != APPLICATION_ID and (has_tables or version):
            raise GalleryError(f"not a facewatch gallery: {self.path} (an SQLite database of "
                               f"another application)")
        if version > SCHEMA_VERSION:
            raise GalleryError(f"gallery {self.path} has schema version {version}, newer than "
                               f"this facewatch supports ({SCHEMA_VERSION}); upgrade facewatch")
        return version

    # --- context manager -------------------------------------------------------------------
    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "Gallery":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- writes ------------------------------------------------------------------------------
    def enroll(self, name: str, embeddings: np.ndarray, model_id: str, sources: Sequence[str],
               qualities: Sequence[float] | None = None) -> int:
        """Add K embeddings to `name` (created if new) in one transaction; return the person id."""
        name = check_name(name)
        vectors = np.asarray(embeddings)
        if vectors.ndim != 2 or vectors.shape[0] < 1 or vectors.shape[1] < 1:
            raise GalleryError(f"embeddings must have shape (K, D) with K, D >= 1, got {vectors.shape}")
        if not np.all(np.isfinite(vectors)):
            raise GalleryError("embeddings contain NaN or infinity")
        k, dim = vectors.shape
        if not isinstance(model_id, str) or not model_id:
            raise GalleryError(f"model_id must be a non-empty string, got {model_id!r}")
        if len(sources) != k:
            raise GalleryError(f"sources must have one entry per embedding ({k}), got {len(sources)}")
        quality = [None] * k if qualities is None else [float(q) for q in qualities]
        if len(quality) != k:
            raise GalleryError(f"qualities must have one entry per embedding ({k}), got {len(quality)}")
        blobs = [row.tobytes() for row in vectors.astype(VECTOR_DTYPE)]
        now = time.time()
        with self._transaction():
            self._check_compatible(dim, model_id)
            self._db.execute("INSERT OR IGNORE INTO persons (name, created) VALUES (?, ?)", (name, now))
            person_id = self._db.execute("SELECT id FROM persons WHERE name = ?", (name,)).fetchone()[0]
            self._db.executemany(
                "INSERT INTO embeddings (person_id, vector, dim, model_id, source, quality, created) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(person_id, blob, dim, model_id, str(src), q, now)
                 for blob, src, q in zip(blobs, sources, quality)])
        return int(person_id)

    def _check_compatible(self, dim: int, model_id: str) -> None:
        rows = self._db.execute("SELECT DISTINCT dim, model_id FROM embeddings LIMIT 2").fetchall()
        for have_dim, have_model in rows:
            if (have_dim, have_model) != (dim, model_id):
                raise GalleryError(
                    f"gallery {self.path} holds embeddings of model {have_model} (dimension "
                    f"{have_dim}); refusing embeddings of model {model_id} (dimension {dim}): "
                    f"embeddings of different models cannot be compared. Use a new gallery or "
                    f"remove everyone and re-enroll with the new model")

    def remove(self, name: str) -> int:
        """Delete a person and their embeddings; return the number of persons removed (0 or 1)."""
        with self._transaction():
            return self._db.execute("DELETE FROM persons WHERE name = ?", (name,)).rowcount

    def _transaction(self) -> "_Transaction":
        return _Transaction(self._db, immediate=True, bump=True, on_error=self._error)

    # --- reads -------------------------------------------------------------------------------
    def data_version(self) -> int:
        """Opaque number that changes whenever any connection commits a change.

        Compare values from the same Gallery object for equality (the PRAGMA part is per
        connection)."""
        try:
            generation = self._db.execute("SELECT value FROM generation").fetchone()[0]
            other = self._db.execute("PRAGMA data_version").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            raise self._error(exc) from exc
        # The counter sees every write made through this class (this connection's included);
        # PRAGMA data_version also sees writes made by other tools.
        return (int(generation) << 32) | (int(other) & 0xFFFFFFFF)

    def persons(self) -> list[PersonInfo]:
        rows = self._db.execute(
            "SELECT p.id, p.name, count(e.id), p.created FROM persons p "
            "LEFT JOIN embeddings e ON e.person_id = p.id GROUP BY p.id ORDER BY p.name").fetchall()
        return [PersonInfo(int(i), n, int(c), float(t)) for i, n, c, t in rows]

    def snapshot(self) -> GallerySnapshot:
        with _Transaction(self._db, immediate=False, bump=False, on_error=self._error):
            version = self.data_version()
            rows = self._db.execute(
                "SELECT e.person_id, p.name, e.vector, e.dim, e.model_id FROM embeddings e "
                "JOIN persons p ON p.id = e.person_id ORDER BY e.id").fetchall()
        if not rows:
            return GallerySnapshot(np.zeros(0, np.int64), [], np.zeros((0, 0), np.float32), None, version)
        kinds = {(dim, model) for _, _, _, dim, model in rows}
        if len(kinds) > 1:
            raise GalleryError(f"gallery {self.path} mixes embeddings of several models "
                               f"{sorted(kinds)}; remove the people enrolled with the old model")
        (dim, model_id), = kinds
        matrix = np.frombuffer(b"".join(r[2] for r in rows), VECTOR_DTYPE).reshape(len(rows), dim)
        return GallerySnapshot(np.array([r[0] for r in rows], np.int64), [r[1] for r in rows],
                               matrix.astype(np.float32), model_id, version)

    def integrity_check(self) -> list[str]:
        """SQLite's full integrity check plus foreign keys: ["ok"] when the file is sound."""
        problems = [r[0] for r in self._db.execute("PRAGMA integrity_check")]
        orphans = self._db.execute("PRAGMA foreign_key_check").fetchall()
        if orphans:
            problems = [p for p in problems if p != "ok"] + [f"{len(orphans)} rows with a dangling "
                                                             f"foreign key"]
        return problems

    def export(self, out: str | os.PathLike | IO[str]) -> int:
        """Write the gallery as JSON (to a path, atomically and 0600, or to a text file object)."""
        with _Transaction(self._db, immediate=False, bump=False, on_error=self._error):
            people = self.persons()
            rows = self._db.execute("SELECT person_id, vector, dim, model_id, source, quality, "
                                    "created FROM embeddings ORDER BY id").fetchall()
        by_person: dict[int, list[dict]] = {p.id: [] for p in people}
        for person_id, vector, _, _, source, quality, created in rows:
            by_person[person_id].append({
                "vector": np.frombuffer(vector, VECTOR_DTYPE).astype(float).tolist(),
                "source": source, "quality": quality, "created": created})
        kinds = sorted({(r[2], r[3]) for r in rows})
        document = {"format": "facewatch-gallery", "schema_version": SCHEMA_VERSION,
                    "model_id": kinds[0][1] if len(kinds) == 1 else None,
                    "dim": kinds[0][0] if len(kinds) == 1 else None, "exported": time.time(),
                    "persons": [{"id": p.id, "name": p.name, "created": p.created,
                                 "embeddings": by_person[p.id]} for p in people]}
        if hasattr(out, "write"):
            json.dump(document, out)
            out.write("\n")
        else:
            _write_private_json(Path(out), document)
        return len(people)


class _Transaction:
    """BEGIN [IMMEDIATE] ... COMMIT, ROLLBACK on any exception; a write that changed rows bumps
    the counter (a no-op remove must not make the daemon reload)."""

    def __init__(self, db: sqlite3.Connection, immediate: bool, bump: bool, on_error=None):
        self.db, self.immediate, self.bump, self.on_error = db, immediate, bump, on_error

    def __enter__(self) -> None:
        # IMMEDIATE takes the write lock now, so a read-then-write cannot fail half-way with BUSY.
        self.db.execute("BEGIN IMMEDIATE" if self.immediate else "BEGIN")
        self.changes = self.db.total_changes

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            try:
                if self.bump and self.db.total_changes != self.changes:
                    self.db.execute("UPDATE generation SET value = value + 1")
                self.db.execute("COMMIT")
                return False
            except BaseException as commit_exc:
                exc = commit_exc
        if self.db.in_transaction:
            self.db.execute("ROLLBACK")
        if isinstance(exc, sqlite3.DatabaseError) and self.on_error:
            raise self.on_error(exc) from exc
        if exc_type is None:  # the COMMIT itself failed
            raise exc
        return False


def check_name(name: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise GalleryError(f"person name must be a non-empty string, got {name!r}")
    name = name.strip()
    if len(name) > MAX_NAME_LENGTH:
        raise GalleryError(f"person name is {len(name)} characters, longer than {MAX_NAME_LENGTH}")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):  # names go into logs and JSON lines
        raise GalleryError(f"person name must not contain control characters, got {name!r}")
    return name


def _write_private_json(path: Path, document: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(document, f)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
