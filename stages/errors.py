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

EXIT_SETUP = 78   # sysexits.h EX_CONFIG


class SetupError(ValueError):
    """A stage cannot start and restarting it will not help."""
