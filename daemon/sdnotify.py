"""systemd's sd_notify protocol: datagrams like b"READY=1" to the unix socket in $NOTIFY_SOCKET.

No libsystemd needed. Without NOTIFY_SOCKET (not run by systemd) every call is a no-op, so the
daemon behaves the same in a terminal. `watchdog_interval()` is half of $WATCHDOG_USEC, as
sd_watchdog_enabled(3) recommends.
"""
from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("facewatch.sdnotify")


class Notifier:
    def __init__(self, env: dict | None = None):
        env = os.environ if env is None else env
        self.address = env.get("NOTIFY_SOCKET") or None
        self._watchdog_usec = int(env.get("WATCHDOG_USEC", "0") or 0)
        watchdog_pid = env.get("WATCHDOG_PID")
        if watchdog_pid and int(watchdog_pid) != os.getpid():
            self._watchdog_usec = 0    # the watchdog is meant for another process
        self._sock: socket.socket | None = None
        if self.address:
            if self.address.startswith("@"):          # abstract namespace
                self.address = "\0" + self.address[1:]
            elif not self.address.startswith("/"):
                log.warning("ignoring NOTIFY_SOCKET=%r: not a unix socket path", self.address)
                self.address = None
        if self.address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            # a unix datagram queue holds few messages: never let a slow reader block the loop
            self._sock.setblocking(False)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings, or None when systemd runs no watchdog for us."""
        return self._watchdog_usec / 2e6 if self._watchdog_usec > 0 else None

    def notify(self, *states: str) -> bool:
        """Send e.g. notify("READY=1", "STATUS=running"); False if not sent (logged)."""
        if self._sock is None:
            return False
        payload = "\n".join(states).encode()
        try:
            self._sock.sendto(payload, self.address)
            return True
        except BlockingIOError:
            log.debug("sd_notify %s dropped: the notify socket's queue is full", states[0])
            return False
        except OSError as exc:   # systemd gone: never fatal for the daemon
            log.warning("sd_notify %s failed: %s", states[0] if states else "", exc)
            return False

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str = "") -> bool:
        return self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def status(self, status: str) -> bool:
        return self.notify(f"STATUS={status}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
