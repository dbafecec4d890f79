"""Image transforms of the official recipe (docs/reference.md §2.2), on PIL images or on the device.

    train: Resize(H, W) bicubic -> Pad(pad) -> RandomCrop(H, W) -> RandomHorizontalFlip -> ToTensor -> Normalize
    test:  Resize(H, W) bicubic -> ToTensor -> Normalize

Resize/pad/crop/flip run on the PIL image (as the official torchvision-v1 pipeline did), so the pixels
match the official code. With the decoded-image cache (`data.cache_images`) the resize is done once
when the cache is built and `DeviceAugment` does pad + crop + flip + normalise on a uint8 batch
wherever the batch lives (the GPU in training), vectorised over the batch.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

from lgur.errors import ConfigError

INTERPOLATION = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
                 "nearest": InterpolationMode.NEAREST}


def _interp(name: str) -> InterpolationMode:
    if name not in INTERPOLATION:
        raise ConfigError(f"data.interpolation: unknown filter '{name}' (known: {', '.join(INTERPOLATION)})")
    return INTERPOLATION[name]


def resize_transform(image_size: Sequence[int], interpolation: str = "bicubic") -> v2.Resize:
    """The resize shared by the train/test pipelines and the image cache (PIL in, PIL out)."""
    return v2.Resize(tuple(image_size), interpolation=_interp(interpolation), antialias=True)


def _to_normalized(mean: Sequence[float], std: Sequence[float]) -> list:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


def build_train_transform(image_size: Sequence[int], mean: Sequence[float], std: Sequence[float], pad: int = 10,
                          flip: bool = True, interpolation: str = "bicubic") -> v2.Compose:
    """PIL image -> augmented, normalised float tensor (3, H, W); the official training recipe."""
    steps = [resize_transform(image_size, interpolation)]
    if pad:
        steps += [v2.Pad(pad, fill=0), v2.RandomCrop(tuple(image_size))]
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps + _to_normalized(mean, std))


def build_test_transform(image_size: Sequence[int], mean: Sequence[float], std: Sequence[float],
                         interpolation: str = "bicubic") -> v2.Compose:
    """PIL image -> resized, normalised float tensor (3, H, W)."""
    return v2.Compose([resize_transform(image_size, interpolation)] + _to_normalized(mean, std))


class DeviceAugment(nn.Module):
    """Pad + random crop + horizontal flip + normalise for a uint8 batch (B, 3, H, W) on its own device.

    In train() mode it draws, per sample, a crop offset in [0, 2*pad] on both axes and a flip bit (the
    distribution of Pad -> RandomCrop -> RandomHorizontalFlip) from its own torch.Generator, then applies
    them with two gathers (no per-sample Python loop). In eval() mode it only normalises. Output float32.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], pad: int = 10, flip: bool = True, seed: int = 0):
        super().__init__()
        self.pad, self.flip, self.seed = int(pad), bool(flip), int(seed)
        self.register_buffer("scale", 1.0 / (255.0 * torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)), persistent=False)
        self.register_buffer("shift", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255.0, persistent=False)
        self._generators: dict[torch.device, torch.Generator] = {}
        self._epoch_seed = self.seed

    def generator(self, device: torch.device) -> torch.Generator:
        """One generator per device, seeded with the current epoch's seed when first used (set_epoch
        reseeds existing ones), so a run resumed at an epoch start draws what the uninterrupted run drew."""
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self._epoch_seed)
        return self._generators[device]

    def set_epoch(self, epoch: int) -> None:
        """Make the augmentation of an epoch independent of how earlier epochs ran (exact resume)."""
        self._epoch_seed = self.seed + 1_000_003 * epoch
        for g in self._generators.values():
            g.manual_seed(self._epoch_seed)

    def sample(self, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample crop offsets (row, col) in [0, 2*pad] and flip flags."""
        g = self.generator(device)
        rows = torch.randint(0, 2 * self.pad + 1, (batch,), generator=g, device=device)
        cols = torch.randint(0, 2 * self.pad + 1, (batch,), generator=g, device=device)
        flips = (torch.rand(batch, generator=g, device=device) < 0.5) & self.flip
        return rows, cols, flips

    def augment(self, images: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        """Crop at the given offsets of the zero-padded image, then flip where asked (uint8 in, uint8 out)."""
        b, c, h, w = images.shape
        r = rows[:, None] - self.pad + torch.arange(h, device=images.device)  # source row of each output row
        q = cols[:, None] - self.pad + torch.arange(w, device=images.device)
        q = torch.where(flips[:, None], q.flip(1), q)
        inside = ((r >= 0) & (r < h))[:, :, None] & ((q >= 0) & (q < w))[:, None, :]  # (B, H, W)
        out = images.gather(2, r.clamp(0, h - 1)[:, None, :, None].expand(b, c, h, w))
        out = out.gather(3, q.clamp(0, w - 1)[:, None, None, :].expand(b, c, h, w))
        return out * inside[:, None].to(out.dtype)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() - self.shift) * self.scale

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.training and (self.pad or self.flip):
            images = self.augment(images, *self.sample(images.shape[0], images.device))
        return self.normalize(images)
