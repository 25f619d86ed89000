"""Issue 12, item 4: `train-embedder --input-size 96` from the crop to the exported file and the
daemon's crop, resuming a run saved before the option existed, and the training-speed
benchmark's short path (real workers, real LFW files)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from facewatch.training.lfw import default_images_dir

LFW = default_images_dir()
needs_lfw = pytest.mark.skipif(not LFW.is_dir(), reason=f"LFW images not found at {LFW} "
                               "(set FACEWATCH_DATA to the shared data folder)")


def train(*extra: str):
    from facewatch.daemon.cli import build_parser
    from facewatch.training.train_embedder import train as train_run

    # box crops: no landmark model or teacher cache needed, the detector's boxes only
    argv = ["train-embedder", "--backbone", "micro", "--epochs", "1", "--steps-per-epoch", "2",
            "--batch", "16", "--max-people", "12", "--val-pairs", "100", "--embedding-size", "16",
            "--alignment", "box", *extra]
    return train_run(build_parser("train-embedder").parse_args(argv))


@needs_lfw
def test_input_size_96_reaches_the_crops_the_network_and_the_exported_file(runs, tmp_path):
    import onnx

    from facewatch.export.embedder_onnx import export_embedder, load_keras_embedder
    from facewatch.stages.face_crop import ARCFACE_TEMPLATE, CropSpec, alignment_matrix, crop_faces
    from facewatch.stages.face_embedder import FaceEmbedder
    from facewatch.training.embedder_data import centre_box, read_image

    run_dir = train("--input-size", "96", "--out", "run-96")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["input_size"] == 96 and summary["args"]["input_size"] == 96
    assert np.isfinite(summary["history"][0]["loss"])
    assert load_keras_embedder(run_dir / "best.keras").input_shape == (None, 96, 96, 3)
    metas = (runs / "embedder_cache").glob("*/meta.json")
    sizes = {json.loads(m.read_text())["size"] for m in metas}
    assert sizes == {96}, "the training crops were not cut at 96"

    onnx_path = tmp_path / "face_embedder.onnx"
    export_embedder(run_dir / "best.keras", onnx_path, summary)
    model = onnx.load(str(onnx_path))
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_value for d in inp.type.tensor_type.shape.dim][1:] == [96, 96, 3]
    assert {p.key: p.value for p in model.metadata_props}["input_size"] == "96"

    # The daemon's runtime class configures its crop from the file ...
    embedder = FaceEmbedder(onnx_path, ["CPUExecutionProvider"], threads=1)
    assert embedder.input_size == 96 and embedder.crop_spec.size == 96
    frame = read_image(sorted(LFW.glob("*/*_0001.jpg"))[0])
    crops, _ = crop_faces(frame, centre_box(frame.shape)[None], embedder.crop_spec)
    vectors = embedder.embed(crops)
    assert vectors.shape == (1, 16) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-4)
    # ... and an aligned crop at 96 puts the five points on the ArcFace template scaled to 96.
    points = ARCFACE_TEMPLATE * 1.7 + [40.0, 25.0]
    matrix = alignment_matrix(points, CropSpec(96, "arcface_five_point").size, "arcface_five_point")
    mapped = points @ matrix[:, :2].T + matrix[:, 2]
    assert np.allclose(mapped, ARCFACE_TEMPLATE * 96 / 112, atol=1e-3)


@needs_lfw
def test_resuming_a_run_saved_before_input_size_existed_keeps_112(runs):
    run_dir = train("--out", "run-before")
    state_file = run_dir / "state.json"
    state = json.loads(state_file.read_text())
    del state["args"]["input_size"]     # what every state written before the option looks like
    state_file.write_text(json.dumps(state))
    # The command's --input-size is ignored on resume, and the missing key means 112, not None.
    run_dir = train("--out", "run-before", "--resume", "--epochs", "2", "--input-size", "96")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["input_size"] == 112 and summary["args"]["input_size"] == 112
    assert summary["epochs_done"] == 2 and summary["steps"] == 4


def test_variant_names():
    from bench.bench_embedder_training import BASELINE, parse_variant

    base = parse_variant(BASELINE)
    assert (base.backend, base.precision, base.input_size, base.data, base.train) == \
        ("tensorflow", "fp32", 112, "synthetic", True)
    v = parse_variant("torch-passive-bf16-96-decode")
    assert (v.backend, v.precision, v.input_size, v.data, dict(v.env)) == \
        ("torch", "bf16", 96, "decode", {"OMP_WAIT_POLICY": "PASSIVE"})
    assert parse_variant("tf-xla-fp32-112").jit and not parse_variant("pipeline-cache-96").train
    for bad in ("tf-fp16-112", "mxnet-fp32-112", "tf-fp32-112-disk", "pipeline-x-112", "tf-fp32-8"):
        with pytest.raises(SystemExit, match="variant"):
            parse_variant(bad)


def bench(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "bench.bench_embedder_training", "--backbone",
                          "micro", "--batch", "16", "--steps", "2", "--warmup", "1", "--rounds",
                          "1", *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


@needs_lfw
def test_bench_times_variants_side_by_side_on_real_files():
    result = bench("--images", "40", "--variants", "tf-bf16-96", "pipeline-decode-96")
    rows = result["variants"]
    assert list(rows) == ["tf-fp32-112", "tf-bf16-96", "pipeline-decode-96"]
    for name, row in rows.items():
        assert "error" not in row, (name, row.get("error"), row.get("log_tail"))
        assert row["samples_per_s"] > 0 and row["ratio_vs_baseline"] > 0
        assert len(row["samples_per_s_by_round"]) == (2 if name == "tf-fp32-112" else 1)
    assert rows["tf-fp32-112"]["ratio_vs_baseline"] == 1.0
    bf16 = rows["tf-bf16-96"]
    assert bf16["input_size"] == 96 and bf16["policy"] == "mixed_bfloat16"
    assert bf16["compute_dtype"] == "bfloat16" and rows["tf-fp32-112"]["compute_dtype"] == "float32"
    ratio = bf16["samples_per_s"] / bf16["baseline_samples_per_s_by_round"][0]
    assert bf16["ratio_vs_baseline"] == pytest.approx(ratio, rel=1e-2)
    pipeline = rows["pipeline-decode-96"]
    assert pipeline["train_step"] is False and pipeline["last_loss"] is None
    assert pipeline["batches_per_s"] == pytest.approx(pipeline["samples_per_s"] / 16, rel=1e-2)
    assert len(result["environment"]["loadavg_at_start"]) == 3 and result["loadavg_1min_during"]


@needs_lfw
def test_bench_reports_a_variant_that_cannot_run_and_goes_on():
    # 8 files cannot fill a batch of 16: each pipeline's worker fails; the bench reports it,
    # tries the next variant and still prints its JSON
    result = bench("--images", "8", "--variants", "pipeline-cache-96", "pipeline-decode-96")
    rows = result["variants"]
    for name in ("pipeline-cache-96", "pipeline-decode-96"):
        assert "fewer than a batch" in rows[name]["error"] and "samples_per_s" not in rows[name]
    assert "error" not in rows["tf-fp32-112"] and rows["tf-fp32-112"]["setup_s"] > 0
