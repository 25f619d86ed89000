"""A real RTSP server for the camera tests: GStreamer's RTSP server via the *system* python3.

    /usr/bin/python3 tests/rtsp_server.py --port 8554 --path /cam

Serves a live, moving test pattern as H.264 at rtsp://127.0.0.1:PORT/PATH, prints
"READY <url>" once listening, and exits on SIGTERM/SIGINT. SIGUSR1 stalls the stream (a valve
drops every buffer: the connection stays open, RTSP keep-alives are answered, no video comes),
SIGUSR2 resumes it; each prints "STALLED" / "RESUMED". Needs the Debian packages
gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-{base,good,ugly} python3-gi (`make test-deps`).
"""
from __future__ import annotations

import argparse
import signal
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402

PIPELINE = ("( videotestsrc is-live=true pattern=ball ! video/x-raw,width={w},height={h},"
            "framerate={fps}/1 ! valve name=gate drop=false ! x264enc tune=zerolatency speed-preset=ultrafast "
            "key-int-max={fps} ! rtph264pay name=pay0 pt=96 config-interval=1 )")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", default="/cam")
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--height", type=int, default=240)
    p.add_argument("--fps", type=int, default=25)
    args = p.parse_args()

    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(PIPELINE.format(w=args.width, h=args.height, fps=args.fps))
    factory.set_shared(True)   # one encoder for every client
    gates = []   # the valve of each media made for clients (a new one stalls too)
    state = {"stalled": False}

    def on_media(_factory, media):
        gate = media.get_element().get_by_name("gate")
        gate.set_property("drop", state["stalled"])
        gates.append(gate)

    factory.connect("media-configure", on_media)

    def set_stalled(stalled: bool) -> bool:
        state["stalled"] = stalled
        for gate in gates:
            gate.set_property("drop", stalled)
        print("STALLED" if stalled else "RESUMED", flush=True)
        return True   # keep the signal source
    server.get_mount_points().add_factory(args.path, factory)
    if server.attach(None) == 0:
        print(f"cannot listen on 127.0.0.1:{args.port}", file=sys.stderr, flush=True)
        return 1
    loop = GLib.MainLoop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, sig, loop.quit)
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGUSR1, lambda: set_stalled(True))
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGUSR2, lambda: set_stalled(False))
    print(f"READY rtsp://127.0.0.1:{args.port}{args.path}", flush=True)
    loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
