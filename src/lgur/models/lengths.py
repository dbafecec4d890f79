"""Caption lengths on the host: what the text encoder packs by (a module of its own, importing only
torch, so the model classes need not import the text backbone's libraries)."""
from __future__ import annotations

import torch


def host_lengths(attention_mask: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Caption lengths as a CPU int64 tensor: the given ones (which must already live on the CPU: moving
    them there would be a hidden sync), else attention_mask.sum(1) (a sync when the mask is on a GPU)."""
    if lengths is None:
        return attention_mask.sum(1).cpu()
    if lengths.device.type != "cpu":
        raise ValueError(f"caption lengths must be a CPU tensor (the batch's `lengths`), got {lengths.device}")
    if lengths.shape != attention_mask.shape[:1]:
        raise ValueError(f"lengths {tuple(lengths.shape)} do not match the batch of {attention_mask.shape[0]} captions")
    return lengths.long()
