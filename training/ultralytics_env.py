"""Make ultralytics work with no network: call before the first `import ultralytics`.

ultralytics probes DNS at import, fetches Arial.ttf at train time and pip-installs missing
helpers; each of these hangs or fails on an offline host (see docs: STACK.md).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path


def configure_offline(config_dir: Path | None = None) -> Path:
    config_dir = Path(config_dir or os.environ.get("YOLO_CONFIG_DIR")
                      or Path.home() / ".config" / "facewatch-ultralytics")
    font_dir = config_dir / "Ultralytics"
    font_dir.mkdir(parents=True, exist_ok=True)
    font = font_dir / "Arial.ttf"
    if not font.exists():
        import matplotlib  # any TTF will do; matplotlib ships DejaVuSans

        shutil.copy(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf", font)
    os.environ["YOLO_CONFIG_DIR"] = str(config_dir)
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ["YOLO_AUTOINSTALL"] = "0"
    return config_dir
