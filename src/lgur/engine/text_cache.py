"""`train.cache_text`: the frozen text backbone's output of every training caption, computed once.

When the text backbone is frozen and no dropout is active in it during training
(`model.text_dropout_in_train: false`, or a backbone whose dropout probabilities are 0), its output for a
caption is the same at every step: running it again each step only costs time (on a 2-core CPU about
15 % of an lgur-small step). The cache runs it once per distinct caption before the first epoch and the
train step then starts from the stored hidden states: the trainable part of the text path (BiLSTM or
projection) and everything after it see the same input as without the cache, up to the float summation
order of the backbone's matrix products (batches padded differently).

Memory: one row of `hidden_size` floats per real token of every distinct training caption (MiniLM,
2k captions of ~30 tokens: ~90 MB; CUHK-PEDES with BERT-base, ~80k captions: several GB), kept on the
training device.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
from tqdm import tqdm

from lgur.engine.precision import autocast
from lgur.errors import ConfigError

log = logging.getLogger("lgur.engine")


def check_cacheable(text_encoder) -> None:
    """Refuse `train.cache_text` where the backbone's training-mode output can change between steps."""
    if not text_encoder.frozen:
        raise ConfigError("train.cache_text needs a frozen text backbone (model.freeze_text: true): a trained "
                          "backbone's output changes every step")
    if text_encoder.dropout_active_in_train():
        raise ConfigError("train.cache_text: dropout is active in the frozen text backbone during training "
                          "(model.text_dropout_in_train: true), so its output differs at every step; set "
                          "model.text_dropout_in_train=false to cache it")


class TextHiddenCache:
    """Hidden states (last layer, real tokens only) of the frozen text backbone for every caption of a
    tokenised caption set, keyed by caption: identical token sequences share one entry.

    `lookup(indices)` -> (B, L, hidden) for the captions `indices` (the training set's caption indices,
    a batch's `indices`), L = their longest length, padded steps 0 (the collate's padding)."""

    def __init__(self, text_encoder, tokens, device: torch.device, dtype: torch.dtype | None = None,
                 batch_size: int = 128, progress: bool = True):
        check_cacheable(text_encoder)
        n = len(tokens)
        row_of, firsts, seen = np.empty(n, dtype=np.int64), [], {}
        for i in range(n):  # distinct token sequences (the key), in first-seen order
            key = tokens.flat[tokens.offsets[i]:tokens.offsets[i + 1]].tobytes()
            row = seen.setdefault(key, len(seen))
            if row == len(firsts):
                firsts.append(i)
            row_of[i] = row
        lengths = np.array([tokens.offsets[i + 1] - tokens.offsets[i] for i in firsts], dtype=np.int64)
        starts = np.zeros(len(firsts) + 1, dtype=np.int64)
        np.cumsum(lengths, out=starts[1:])
        backbone = text_encoder.backbone
        hidden = backbone.config.hidden_size
        self.flat = None
        order = np.argsort(-lengths, kind="stable")  # similar lengths together: little padding
        was_training = text_encoder.training
        text_encoder.train()  # the mode training runs the backbone in (checked above: no dropout active)
        try:
            with torch.no_grad():
                for b in tqdm(range(0, len(order), batch_size), desc="encoding training captions once "
                              "(train.cache_text)", unit="batch", disable=not progress):
                    rows = order[b:b + batch_size]
                    seqs = [tokens[firsts[r]] for r in rows]
                    longest = max(len(s) for s in seqs)
                    ids = torch.zeros((len(seqs), longest), dtype=torch.long)
                    mask = torch.zeros((len(seqs), longest), dtype=torch.long)
                    for k, s in enumerate(seqs):
                        ids[k, :len(s)], mask[k, :len(s)] = s, 1
                    with autocast(device, dtype):
                        out = backbone(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
                    if self.flat is None:
                        self.flat = torch.empty((int(starts[-1]), hidden), dtype=out.dtype, device=device)
                    for k, r in enumerate(rows):
                        self.flat[int(starts[r]):int(starts[r + 1])] = out[k, :int(lengths[r])]
        finally:
            text_encoder.train(was_training)
        self.row_of = torch.from_numpy(row_of)
        self.lengths_cpu = torch.from_numpy(lengths)  # the batch length is found on the host: no device sync
        self.starts = torch.from_numpy(starts[:-1]).to(device)
        self.lengths = self.lengths_cpu.to(device)
        self.device = device
        log.info("train.cache_text: %d captions (%d distinct, %d tokens) encoded once by the frozen text "
                 "backbone, %.0f MB on %s", n, len(firsts), int(starts[-1]),
                 self.flat.numel() * self.flat.element_size() / 2**20, device)

    def __len__(self) -> int:
        return len(self.row_of)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """(B,) caption indices -> (B, L, hidden) hidden states, L = the longest of them, padded with 0."""
        rows = self.row_of[indices.cpu()]
        longest = int(self.lengths_cpu[rows].max())
        rows = rows.to(self.device, non_blocking=True)
        lengths, starts = self.lengths[rows], self.starts[rows]
        steps = torch.arange(longest, device=self.device)
        valid = steps < lengths[:, None]
        out = self.flat[(starts[:, None] + steps).clamp(max=self.flat.shape[0] - 1)]
        return out * valid[..., None].to(out.dtype)
