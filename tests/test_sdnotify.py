"""sd_notify on a real unix datagram socket: the Notifier alone, then the real supervisor
(READY=1 once every stage is up, WATCHDOG=1 while healthy, STOPPING=1 on SIGTERM, exit 0)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time

import pytest

from conftest import wait_for, write_config
from facewatch.daemon.sdnotify import Notifier


@pytest.fixture
def notify_socket(short_dir):
    path = short_dir / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.2)
    yield sock, str(path)
    sock.close()


class Datagrams:
    """Everything received on the socket, read continuously (as systemd does) by a thread."""

    def __init__(self, sock):
        self.sock, self.messages = sock, []
        self.running = True
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        while self.running:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except (socket.timeout, BlockingIOError):
                pass
            except OSError:
                return

    def poll(self) -> list[str]:
        return list(self.messages)

    def close(self):
        self.running = False
        self.thread.join(2)

    def states(self) -> list[str]:
        return [line for msg in self.poll() for line in msg.split("\n")]

    def wait(self, state: str, timeout: float, count: int = 1) -> list[str]:
        return wait_for(lambda: self.states().count(state) >= count and self.states(),
                        timeout, f"{count} x {state} on NOTIFY_SOCKET")


def test_notifier_sends_datagrams(notify_socket):
    sock, path = notify_socket
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "3000000"})
    assert n.enabled and n.watchdog_interval() == 1.5
    assert n.ready("2/2 stages") and n.watchdog() and n.stopping()
    got = [sock.recv(4096).decode() for _ in range(3)]
    assert got == ["READY=1\nSTATUS=2/2 stages", "WATCHDOG=1", "STOPPING=1"]
    n.close()


def test_notifier_abstract_socket_and_no_socket():
    name = f"fw-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2)
    try:
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).ready()
        assert sock.recv(100) == b"READY=1"
    finally:
        sock.close()
    quiet = Notifier({})
    assert not quiet.enabled and not quiet.ready() and quiet.watchdog_interval() is None
    other = Notifier({"NOTIFY_SOCKET": "/nonexistent/x", "WATCHDOG_USEC": "1000000",
                      "WATCHDOG_PID": str(os.getpid() + 1)})
    assert other.watchdog_interval() is None      # the watchdog belongs to another process
    assert not other.ready()                      # sending fails: logged, never raised


def test_supervisor_ready_watchdog_stopping(notify_socket, short_video, short_dir, daemons, request):
    """The real `facewatch run`: with `supervisor.stages: [capture]` only the capture stages run
    here (the others would run on other hosts), so this needs no trained model."""
    sock, path = notify_socket
    config = write_config(short_dir / "config.yaml",
                          [{"name": "a", "uri": str(short_video.path), "loop": True},
                           {"name": "b", "uri": str(short_video.path), "loop": True}],
                          runtime={"dir": str(short_dir / "run")},
                          supervisor={"stages": ["capture"]})
    daemon = daemons(config, short_dir / "run",
                     env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"})
    events = Datagrams(sock)
    request.addfinalizer(events.close)
    events.wait("READY=1", 60)
    status = daemon.status()
    assert status["ready"] and set(status["stages"]) == {"capture:a", "capture:b"}
    assert all(s["pid"] and s["state"] == "running" for s in status["stages"].values())
    events.wait("WATCHDOG=1", 10, count=3)       # every WATCHDOG_USEC / 2
    before = time.monotonic()
    assert daemon.stop(timeout=10) == 0
    assert time.monotonic() - before < 10
    states = events.states()
    assert "STOPPING=1" in states
    assert states.index("READY=1") < states.index("STOPPING=1")
    assert not any(s.get("pid") for s in daemon.status()["stages"].values())


def unit_directives(path) -> dict[str, list[str]]:
    """[Service]/[Unit] directives of a unit file (continuation lines joined, repeats kept)."""
    out: dict[str, list[str]] = {}
    text = path.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_systemd_unit(tmp_path):
    from conftest import REPO
    from facewatch.daemon.config import SupervisorConfig

    unit = REPO / "systemd" / "facewatch.service"
    d = unit_directives(unit)
    one = {k: v[-1] for k, v in d.items()}
    assert one["Type"] == "notify" and one["Restart"] == "on-failure"
    assert int(one["WatchdogSec"]) > 2 * SupervisorConfig().heartbeat_s
    assert one.get("User") or one.get("DynamicUser") == "yes"
    assert one["StateDirectory"] and one["RuntimeDirectory"]
    for key, value in [("ProtectSystem", "strict"), ("NoNewPrivileges", "yes"),
                       ("PrivateTmp", "yes"), ("ProtectHome", "yes"), ("KillMode", "mixed"),
                       ("DevicePolicy", "closed")]:
        assert one.get(key) == value, key
    allowed = " ".join(d["DeviceAllow"])
    assert "nvidia" in allowed and "video4linux" in allowed
    # the drain (shutdown_timeout_s) must finish before systemd's SIGKILL
    assert int(one["TimeoutStopSec"]) >= SupervisorConfig().shutdown_timeout_s + 3
    assert " run --config " in one["ExecStart"]
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed: directives checked, syntax not verified")
    # verify the unit as systemd reads it (the install path does not exist here: use /bin/true)
    copy = tmp_path / "facewatch.service"
    copy.write_text(unit.read_text().replace("/opt/facewatch/.venv/bin/facewatch", "/bin/true"))
    result = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True,
                            timeout=60)
    problems = [l for l in (result.stdout + result.stderr).splitlines() if "facewatch.service" in l]
    assert result.returncode == 0 and not problems, problems
