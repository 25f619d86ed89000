"""Run-wide counters that outlive stage processes: event identity across stage restarts.

A stage process may be SIGKILLed and restarted at any time; what identifies an event must not
start again with it. The supervisor creates `<runtime dir>/run-state` (0600, zeroed, with a new
random run id) when the daemon starts; each stage maps it (MAP_SHARED) and takes numbers from
its own slot:

- `event_seq` (publish): the `seq` of every public event; taken *before* the event is sent, so
  a crash can leave a gap (an event that may have been lost) but never a repeated number.
- `track_id` (detect): every tracker id becomes a run-wide id the first time it is seen, so a
  restarted detect (whose tracker starts again at 1) or a tracker reset at a camera's end of
  stream never reuses a (camera, track_id) within the run.

A value written to a shared mapping is in the page cache the moment the store completes, so a
process killed right after still leaves it for its successor. Each slot has one writer at a time
(the supervisor starts a stage only after its previous process exited).

A stage started by hand without a runtime directory counts in memory (ids unique per process).
"""
from __future__ import annotations

import mmap
import os
import struct
import uuid
from pathlib import Path

FILE_NAME = "run-state"
SLOTS = {"event_seq": 0, "track_id": 1}
_RUN_ID_OFFSET = 64          # 16 bytes: the run id (uuid4)
_SIZE = 4096


def create(runtime_dir: Path) -> str:
    """A fresh run-state file (every counter 0, a new run id); returns the run id (hex)."""
    path = Path(runtime_dir) / FILE_NAME
    run_id = uuid.uuid4()
    tmp = path.with_name(f".{FILE_NAME}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        data = bytearray(_SIZE)
        data[_RUN_ID_OFFSET:_RUN_ID_OFFSET + 16] = run_id.bytes
        os.write(fd, bytes(data))
    finally:
        os.close(fd)
    os.replace(tmp, path)   # a stage never maps a half-written file
    return run_id.hex


class RunCounters:
    """The counters of one daemon run (see the module docstring)."""

    def __init__(self, runtime_dir: Path | None):
        self._mm: mmap.mmap | None = None
        self._memory = dict.fromkeys(SLOTS, 0)
        self.run_id = uuid.uuid4().hex
        path = None if runtime_dir is None else Path(runtime_dir) / FILE_NAME
        if path is None:
            return
        if not path.exists():   # a stage started by hand on a runtime dir: start a run
            create(path.parent)
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            self._mm = mmap.mmap(fd, _SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.run_id = uuid.UUID(bytes=bytes(self._mm[_RUN_ID_OFFSET:_RUN_ID_OFFSET + 16])).hex

    def take(self, slot: str) -> int:
        """The slot's next number (0, 1, 2, ... within the run)."""
        if self._mm is None:
            value = self._memory[slot]
            self._memory[slot] = value + 1
            return value
        offset = SLOTS[slot] * 8
        (value,) = struct.unpack_from("<Q", self._mm, offset)
        struct.pack_into("<Q", self._mm, offset, value + 1)
        return value

    def close(self) -> None:
        if self._mm is not None:
            self._mm.close()
            self._mm = None
