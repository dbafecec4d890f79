"""Retrieval evaluation of a model on one split (docs/reference.md §3): encode, then lgur.eval metrics.

Queries are all captions of the split, the gallery all its images (the official protocol). Directions:
    t2i     text -> image, every gallery image counts (the paper's numbers)
    t2i_wm  text -> image with each caption's own image removed from the gallery ("without match";
            queries whose identity has no other image are dropped), the official second log line
    i2t     image -> text (optional direction)
Embeddings are computed under no_grad (and autocast where the run uses it), in batches, written into
one preallocated tensor per side, and stay on the device for the metric computation. The split itself
comes from lgur.data.build_eval_split; the printed table from lgur.eval.table.
"""
from __future__ import annotations

from typing import Callable

import torch
from tqdm import tqdm

from lgur.engine.precision import autocast
from lgur.errors import ConfigError
from lgur.eval.metrics import text_image_metrics

DIRECTIONS = ("t2i", "t2i_wm", "i2t")


@torch.no_grad()
def encode_split(model: torch.nn.Module, split, device: torch.device, dtype: torch.dtype | None,
                 prepare: Callable[[torch.Tensor, bool], torch.Tensor], progress: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(image embeddings (G, D), caption embeddings (Q, D)) of an EvalSplit, in dataset order."""
    was_training = model.training
    model.eval()
    dim = model.embedding_dim
    images = torch.empty(len(split.images), dim, device=device)
    texts = torch.empty(len(split.captions), dim, device=device)
    bar = dict(disable=not progress, leave=False, unit="batch")
    for batch in tqdm(split.image_loader, desc=f"encoding {split.name} images", **bar):
        x = prepare(batch["images"].to(device, non_blocking=True), False)
        with autocast(device, dtype):
            images[batch["indices"].to(device)] = model.encode_images(x).float()
    for batch in tqdm(split.caption_loader, desc=f"encoding {split.name} captions", **bar):
        ids, mask = batch["input_ids"].to(device, non_blocking=True), batch["attention_mask"].to(device)
        with autocast(device, dtype):
            texts[batch["indices"].to(device)] = model.encode_texts(ids, mask, batch.get("lengths")).float()
    model.train(was_training)
    return images, texts


def split_metrics(images: torch.Tensor, texts: torch.Tensor, split, directions: tuple[str, ...] = ("t2i",),
                  chunk_size: int = 1024) -> dict[str, dict[str, float]]:
    """{direction: metrics} for directions among t2i, t2i_wm, i2t, from the embeddings of encode_split."""
    unknown = sorted(set(directions) - set(DIRECTIONS))
    if unknown:
        raise ConfigError(f"unknown evaluation direction(s) {unknown}; known: {', '.join(DIRECTIONS)}")
    dev = images.device
    return text_image_metrics(texts, images, split.caption_pids.to(dev), split.image_pids.to(dev), directions,
                              split.caption_image_index.to(dev), chunk_size=chunk_size)


def evaluate(model: torch.nn.Module, split, device: torch.device, dtype: torch.dtype | None,
             prepare: Callable[[torch.Tensor, bool], torch.Tensor], directions: tuple[str, ...] = ("t2i",),
             chunk_size: int = 1024, progress: bool = True) -> dict[str, dict[str, float]]:
    images, texts = encode_split(model, split, device, dtype, prepare, progress)
    return split_metrics(images, texts, split, directions, chunk_size)


def flatten(metrics: dict[str, dict[str, float]], prefix: str) -> dict[str, float]:
    """{"t2i": {"R@1": ..}} -> {"<prefix>/t2i/R@1": ..} (CSV columns, TensorBoard tags)."""
    return {f"{prefix}/{d}/{k}": float(v) for d, m in metrics.items() for k, v in m.items()}
