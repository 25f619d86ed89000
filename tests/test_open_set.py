"""The open-set operating point (issue 13, item 10): a target false-accept rate per decision,
turned into a threshold for the gallery's size from the impostor similarities measured on the
validation pairs and stored in the embedder's metadata (stages.open_set)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import EMBEDDER, read_jsonl, write_config
from facewatch.stages.open_set import FarTable, operating_point, pair_far_for


def test_far_table_from_impostor_scores():
    rng = np.random.default_rng(0)
    scores = rng.normal(0.1, 0.12, 400_000)
    table = FarTable.from_scores(scores, images=900, source="synthetic")
    assert table.far[0] == 0.1 and table.pairs == 400_000
    assert table.far[-1] >= 20 / 400_000   # only FARs measured with >= 20 impostors above
    for far, thr in zip(table.far, table.threshold):
        assert abs(np.mean(scores >= thr) - far) <= max(0.05 * far, 2 / len(scores))
    assert list(table.threshold) == sorted(table.threshold)
    again = FarTable.from_metadata(table.to_json())
    assert again == table
    with pytest.raises(ValueError, match="FAR must decrease"):
        FarTable((0.01, 0.1), (0.5, 0.4))


def test_threshold_follows_gallery_size_and_target():
    table = FarTable((0.1, 0.01, 0.001, 0.0001), (0.2, 0.4, 0.55, 0.65))
    assert pair_far_for(0.01, 1) == pytest.approx(0.01)
    assert pair_far_for(0.01, 100) == pytest.approx(1 - 0.99 ** (1 / 100))
    one, ten, hundred = (operating_point(table, 0.01, n) for n in (1, 10, 100))
    assert one.threshold == pytest.approx(0.4) and not one.extrapolated
    assert one.threshold < ten.threshold < hundred.threshold   # more people: stricter
    assert hundred.threshold == pytest.approx(0.65, abs=0.002)  # pair FAR ~1e-4
    assert operating_point(table, 0.05, 100).threshold < hundred.threshold
    huge = operating_point(table, 0.01, 100_000)   # pair FAR 1e-7: beyond what was measured
    assert huge.extrapolated and hundred.threshold < huge.threshold <= 1.0
    assert operating_point(table, 0.5, 1).threshold == 0.2   # above the table: its first entry
    assert "pair FAR" in hundred.describe() and "100 gallery embeddings" in hundred.describe()


def test_shipped_embedder_carries_its_impostor_distribution():
    """Measured through the runtime path on the validation pairs (evaluate-embedder)."""
    from facewatch.stages.embed_stage import read_embedder_info

    info = read_embedder_info(EMBEDDER)
    table = info.far_table
    assert table is not None, "models/face_embedder.onnx has no impostor_far_table"
    assert table.pairs > 100_000 and "lfw_val_pairs" in table.source
    # its FAR 1e-3 entry agrees with the pair threshold in its metadata (models/README.md)
    assert table.threshold_at(1e-3)[0] == pytest.approx(info.threshold, abs=0.01)


def test_match_config_takes_a_target_far_and_keeps_a_raw_override(tmp_path):
    from facewatch.daemon.config import load_config

    cfg = load_config(write_config(tmp_path / "c.yaml", [{"name": "a", "uri": "a.mp4"}]))
    assert cfg.match.target_far == 0.01 and cfg.match.threshold is None
    cfg = load_config(write_config(tmp_path / "c.yaml", [{"name": "a", "uri": "a.mp4"}],
                                   match={"target_far": 0.001, "threshold": 0.3}))
    assert (cfg.match.target_far, cfg.match.threshold) == (0.001, 0.3)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_strangers_in_the_shared_clip_are_not_named(models, knn_dir, data_dir, short_dir, daemons):
    """The demo's sample gallery (the five people of faces_small) and the shared clip, whose
    people are none of them: at the daemon's default operating point (target FAR 1% per
    decision) nobody is named. The demo's former small-gallery threshold (0.236, the best
    pair-accuracy point) named every stranger it decided on."""
    from test_pipeline import enroll_people

    clip = data_dir / "videos" / "facenet_pytorch_video.mp4"
    if not clip.is_file():
        pytest.skip(f"the shared clip is not at {clip}")
    detector, embedder = models
    config = write_config(short_dir / "config.yaml",
                          [{"name": "clip", "uri": str(clip), "realtime": False}],
                          runtime={"dir": str(short_dir / "run")}, detect={"batch_max": 4})
    cfg = yaml.safe_load(config.read_text())
    enrolled = enroll_people(Path(cfg["gallery"]["path"]), knn_dir / "train", detector, embedder)
    assert len(enrolled) >= 4, enrolled
    daemon = daemons(config, short_dir / "run")
    assert daemon.wait_exit(300) == 0, daemon.log_text()[-3000:]
    events = read_jsonl(Path(cfg["publish"]["event_log"]))
    decisions = [e for e in events if e["type"] in ("recognized", "unknown")]
    assert len(decisions) >= 3, events
    assert [e for e in decisions if e["type"] == "recognized"] == [], \
        json.dumps([e for e in decisions if e["type"] == "recognized"])[:2000]
    log = daemon.log_text()
    assert "for a false-accept rate of 0.01 per decision against" in log, log[-3000:]
    # the threshold the events carry is the one derived for this gallery: the per-decision
    # target spread over its entries, stricter than the model's FAR 1% pair threshold
    from facewatch.stages.embed_stage import read_embedder_info
    from facewatch.stages.gallery import Gallery

    table = read_embedder_info(embedder).far_table
    with Gallery(Path(cfg["gallery"]["path"]), create=False) as gallery:
        entries = len(gallery.snapshot().names)
    expected = operating_point(table, 0.01, entries).threshold
    assert expected > table.threshold_at(0.01)[0]
    assert all(e["threshold"] == pytest.approx(expected, abs=1e-4) for e in decisions), decisions
    # and at a loose threshold (FAR 5% per pair, where a best pair-accuracy threshold lies)
    # some of these strangers would have been named
    assert any(e["similarity"] >= table.threshold_at(0.05)[0] for e in decisions), decisions


def test_tar_at_the_far_table_threshold():
    """evaluate-embedder's steadier TAR: same-person pairs at or above the table's threshold."""
    from facewatch.training.evaluate_embedder import tar_at_table_far

    impostors = np.linspace(-0.5, 0.5, 100_000)          # 100 of them above ~0.499
    table = FarTable.from_scores(impostors, images=400)
    threshold = table.threshold[table.far.index(1e-3)]
    assert 0.498 < threshold < 0.5
    genuine = np.array([0.9, 0.7, 0.5, 0.49, 0.2])
    assert tar_at_table_far(genuine, table, 1e-3) == pytest.approx(3 / 5)
    assert tar_at_table_far(genuine, table, 1e-9) is None   # not a FAR the table holds
