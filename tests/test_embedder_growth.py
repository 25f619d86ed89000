"""Growing a trained embedder deeper (`--backbone deep --init-from` a `small` checkpoint): the
grown network must compute what the trained one did before it trains on, and anything that is
not growth (a missing middle block, another width) must be refused by name."""
from __future__ import annotations

import argparse

import numpy as np
import pytest

from facewatch.training.embedder_model import grown_blocks
from facewatch.training.train_embedder import (_build, _commit_checkpoint, _init_from,
                                               add_arguments)

CLASSES = 6


def test_grown_blocks_are_the_ones_that_only_lengthen_a_stage():
    saved = {f"s{s}b{b}_dwconv/kernel" for s, depth in enumerate((2, 2, 4, 2)) for b in range(depth)}
    saved |= {"stem_conv/kernel", "projection/kernel"}
    wanted = sorted(saved | {f"s2b{b}_{part}" for b in (4, 5, 6, 7, 10)
                             for part in ("dwconv/kernel", "scale/gamma")})
    assert grown_blocks(saved, wanted) == [(2, 4), (2, 5), (2, 6), (2, 7), (2, 10)]
    assert grown_blocks(saved, sorted(saved)) == []
    # a block missing in the middle of a saved stage is not growth
    assert grown_blocks(saved - {"s1b0_dwconv/kernel"}, sorted(saved)) == []
    # nor is a stage the checkpoint never had
    assert grown_blocks(saved, sorted(saved | {"s4b0_dwconv/kernel"})) == []


def _trainer(backbone: str):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--backbone", backbone, "--input-size", "96", "--dropout", "0",
                              "--drop-path", "0"])
    return _build(args, CLASSES)


def test_a_deep_network_grown_from_a_small_checkpoint_computes_what_it_did(tmp_path):
    small = _trainer("small")
    rng = np.random.default_rng(3)
    for v in small.weights:   # a "trained" network: nothing left at its initial value
        if v.path.endswith("scale/gamma"):   # residual branches switched on
            v.assign(rng.uniform(0.2, 0.6, v.shape).astype(np.float32))
        elif v.path.endswith(("kernel", "bias", "centres")):
            v.assign((np.asarray(v.numpy()) + rng.normal(0, 0.02, v.shape)).astype(np.float32))
    folder = tmp_path / "ckpt"
    _commit_checkpoint(small, {"args": {"max_people": None}}, folder)

    deep = _trainer("deep")
    assert deep.embedder.count_params() > small.embedder.count_params() * 1.2
    fresh = deep.embedder.predict(images := rng.uniform(0, 255, (4, 96, 96, 3)).astype(np.float32),
                                  verbose=0)
    line = _init_from(deep, folder, CLASSES)
    assert "4 new blocks (s2b4, s2b5, s2b6, s2b7) passing their input through" in line
    before = small.embedder.predict(images, verbose=0)
    after = deep.embedder.predict(images, verbose=0)
    assert np.abs(after - before).max() < 1e-4
    assert np.abs(fresh - before).max() > 0.1   # the check above can tell a load from none
    # the centres came along (tolerance: the checkpoint keeps them in float16)
    assert np.allclose(deep.head.centres.numpy(), small.head.centres.numpy(), atol=1e-3)


def test_a_checkpoint_that_is_not_a_shorter_network_is_refused_by_name(tmp_path):
    small = _trainer("small")
    folder = tmp_path / "ckpt"
    _commit_checkpoint(small, {"args": {"max_people": None}}, folder)
    with np.load(folder / "weights.npz") as saved:   # drop a block in the middle of stage 1
        arrays = {k: saved[k] for k in saved.files if not k.startswith("s1b0_")}
    np.savez(folder / "weights.npz", **arrays)
    with pytest.raises(ValueError, match="s1b0_"):
        _init_from(_trainer("small"), folder, CLASSES)
    _commit_checkpoint(_trainer("wide"), {"args": {"max_people": None}}, folder)
    with pytest.raises(ValueError, match="does not fit this network"):
        _init_from(_trainer("deep"), folder, CLASSES)
    # growth only: a deeper checkpoint into a shorter network would drop trained blocks
    _commit_checkpoint(_trainer("deep"), {"args": {"max_people": None}}, folder)
    with pytest.raises(ValueError, match=r"blocks this network lacks \(\['s2b4_dwconv'"):
        _init_from(_trainer("small"), folder, CLASSES)
