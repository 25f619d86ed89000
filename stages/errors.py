"""Errors that end a stage for good: a restart cannot fix them.

A stage whose setup raises `SetupError` (a missing, corrupt or wrong model file, an unreadable
key file) exits with `EXIT_SETUP`; the supervisor then stops the whole daemon with that status
instead of restarting the stage in a loop, and systemd does not restart it either
(`RestartPreventExitStatus=` in the unit). The message names the file or config key and what
was expected.

A module of its own so that light importers (enrollment, benchmarks) need not import ZeroMQ or
prometheus_client to catch it.
"""
from __future__ import annotations

# The exit statuses of `facewatch` (README "Exit statuses"; the unit's RestartPreventExitStatus):
EXIT_OK = 0               # every stream ended, or SIGTERM/SIGINT and the drain finished
EXIT_FAILURE = 1          # an unexpected error (a traceback says where)
EXIT_USAGE = 2            # bad command line; a refused request (enroll photo, gallery action)
EXIT_CAMERAS_FAILED = 69  # sysexits.h EX_UNAVAILABLE: every camera ended with an error
EXIT_SETUP = 78           # sysexits.h EX_CONFIG: configuration, model or key file unusable
EXIT_PIPE = 141           # 128 + SIGPIPE: the reader of stdout went away


class SetupError(ValueError):
    """A stage cannot start and restarting it will not help."""


class ModelError(SetupError):
    """A model file that cannot be used; the message names the file and what was expected.
    Fatal for the daemon: restarting a stage does not change the file. (Here, not in
    stages.onnx_session, so that reading a model's metadata needs no onnxruntime.)"""
