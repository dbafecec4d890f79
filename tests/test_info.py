"""`lgur info`: parameter counts of the paper configuration against the official model's
(docs/reference.md §7 and §9), and the CLI output formats."""
from __future__ import annotations

import json

import pytest

from lgur.cli import main
from lgur.config import load_config
from lgur.models.info import count_config

# measured on the official code (docs/reference.md §9), per module
OFFICIAL = {"image_backbone": 19_888_896, "bilstm": 3_538_944, "R": 1_182_720, "Pdec": 10_229_248,
            "projections": 1_179_648, "dictionary": 153_600, "prototypes": 2_304, "gate": 385}
BERT_WITH_POOLER, POOLER = 109_482_240, 768 * 768 + 768
PAPER_TOTAL, PAPER_TRAINABLE = 145_657_985, 36_175_745  # used at inference; trainable minus unused parts


@pytest.fixture(scope="module")
def cuhk_counts():
    return count_config(load_config("lgur_cuhk"), num_classes=11000)


def test_paper_configuration_matches_official_counts(cuhk_counts):
    c = cuhk_counts
    for key, n in OFFICIAL.items():
        assert c["modules"][key] == n, key
    assert c["modules"]["text_backbone"] == BERT_WITH_POOLER - POOLER  # the unused pooler is not built
    assert c["trainable_modules"]["text_backbone"] == 0
    assert sum(c["modules"].values()) == c["total"] and set(c["modules"]) == set(OFFICIAL) | {"text_backbone"}
    assert c["total"] == PAPER_TOTAL - POOLER
    assert c["trainable"] == PAPER_TRAINABLE == sum(OFFICIAL.values())  # everything but the frozen BERT
    assert c["classifiers"] == 6 * (512 * 11000 + 11000) == 33_858_000


def test_info_cli_json_and_table(capsys):
    assert main(["info", "--config", "lgur_tiny", "--json", "--num-classes", "16"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"total", "trainable", "classifiers", "modules"}
    assert out["classifiers"] == 6 * (32 * 16 + 16)  # lgur_tiny: embed_dim 32
    assert sum(out["modules"].values()) == out["total"]
    assert out["trainable"] == out["total"] - out["modules"]["text_backbone"]  # BERT frozen
    assert main(["info", "--config", "lgur_tiny", "--set", "model.freeze_text=false"]) == 0
    table = capsys.readouterr().out
    assert "Pdec (PGU decoder)" in table and "total (without ID classifiers)" in table
    total_line = next(line for line in table.splitlines() if line.startswith("total"))
    assert total_line.split()[-1] == total_line.split()[-2]  # nothing frozen: trainable == total
