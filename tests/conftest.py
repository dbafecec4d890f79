"""Shared fixtures: a tiny synthetic dataset (CUHK-PEDES layout) generated once per test session."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """24 identities x 4 images x 2 captions: 19 train / 2 val / 3 test ids (the synth 80/10/10 split)."""
    from lgur.data.synth import generate

    out = tmp_path_factory.mktemp("synth24")
    generate(out, num_ids=24, seed=0, images_per_id=4, workers=1, progress=False)
    return out
