"""One daemon per runtime directory: an exclusive lock on `<runtime dir>/lock`.

A second `facewatch run` on the same runtime directory (the service running, an operator
starting one by hand with the same config) would rebind the first one's ipc sockets and
overwrite the config its stages restart with, silently cutting the running pipeline in two. The
lock is taken before anything in the directory is touched and is released by the kernel when
the supervisor exits in any way, SIGKILL included: a directory left behind by a killed daemon
is simply reused (its sockets are rebound, its status, metrics and run state started afresh).
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

from facewatch.stages.errors import SetupError

LOCK_NAME = "lock"


def lock_runtime_dir(runtime: Path) -> int:
    """Take the lock (held until this process exits) or raise naming the holder's pid."""
    path = Path(runtime) / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise SetupError(f"another facewatch (pid {holder}) is running with runtime directory "
                         f"{runtime}; stop it, or give this one another runtime.dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    # a killed predecessor's status.json would say "ready" for a daemon that is not there
    (Path(runtime) / "status.json").unlink(missing_ok=True)
    return fd
