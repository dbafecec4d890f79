"""Torch datasets, the collate function, the decoded-image cache, the one eval-split builder and
`build_loaders` (train loader from lgur.data.sampling, val and test splits) for the engine.

Batches are dicts (docs/architecture.md, Data contract):
    TrainPairs    images (B,3,H,W), input_ids (B,L), attention_mask (B,L), lengths (B,), labels (B,), indices (B,)
    EvalImages    images, labels (= person ids), indices
    EvalCaptions  input_ids, attention_mask, lengths, labels, image_indices (each caption's own image), indices
    ImageFolderSet images, indices (into `dataset.paths`; undecodable images are left out of the batch)
L is the longest caption of the batch; `lengths` (= attention_mask.sum(1)) stays on the CPU, where the
text encoder's packing needs it (no device->host copy in the step). Captions are tokenised once when a
dataset is built; captions over `max_caption_tokens` are truncated and counted.

Bad images never stop an epoch: a training pair whose image cannot be decoded is replaced by another
pair, an evaluation image by a blank (mean-colour) image so the gallery keeps its size, and a search
image is left out. Each failure is logged with the file name and counted per image (one counter per
image in shared memory, written by whichever DataLoader worker decoded it, so nothing depends on the
workers reporting back); `DataLoaders.problems()` names every such record (annotation file + record
index) with its count, and `DataLoaders.report()` summarises them. With `data.cache_images` the images
are decoded once up front and bad ones are known before training.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2.functional import pil_to_tensor
from tqdm import tqdm

from lgur.data.annotations import IMAGE_DIR, Annotations, Problem, Record
from lgur.data.images import DECODE_ERRORS, IMAGE_EXTENSIONS, load_rgb
from lgur.data.sampling import EpochSampler, resumable_loader
from lgur.data.transforms import DeviceAugment, build_test_transform, build_train_transform, resize_transform
from lgur.errors import ConfigError, DataError

log = logging.getLogger(__name__)
_MAX_SUBSTITUTIONS = 20  # a training item tries this many other pairs before declaring the data broken


# ---------------------------------------------------------------------------------------------------
# captions


class TokenizedCaptions:
    """All captions of a dataset tokenised once (one flat int32 array + offsets: cheap to share with
    DataLoader workers). Captions longer than max_tokens are truncated by the tokenizer (keeping the
    closing special token) and counted in `truncated` (from the tokenizer's overflow rows)."""

    def __init__(self, captions: Sequence[str], tokenizer, max_tokens: int):
        if max_tokens <= tokenizer.num_special_tokens_to_add():
            raise ConfigError(f"data.max_caption_tokens={max_tokens} leaves no room for text")
        seqs: list[list[int]] = []
        self.truncated = 0
        self.truncated_rows = np.zeros(0, dtype=np.int64)  # which captions were truncated
        if captions:
            enc = tokenizer(list(captions), truncation=True, max_length=max_tokens, return_overflowing_tokens=True,
                            verbose=False)
            owner = enc["overflow_to_sample_mapping"]  # one row per max_tokens window; the first is the caption
            seqs = [ids for k, ids in enumerate(enc["input_ids"]) if k == 0 or owner[k] != owner[k - 1]]
            self.truncated_rows = np.flatnonzero(np.bincount(owner, minlength=len(captions)) > 1)
            self.truncated = len(self.truncated_rows)
        self.offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
        np.cumsum([len(s) for s in seqs], out=self.offsets[1:])
        self.flat = np.fromiter((t for s in seqs for t in s), dtype=np.int32, count=int(self.offsets[-1]))
        self.max_tokens = max_tokens

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.flat[self.offsets[i]:self.offsets[i + 1]].astype(np.int64))


def _tokenize(captions: Sequence[str], tokenizer, max_tokens: int, what: str) -> TokenizedCaptions:
    tok = TokenizedCaptions(captions, tokenizer, max_tokens)
    if tok.truncated:
        log.warning("%s: %d of %d captions longer than %d tokens were truncated (data.max_caption_tokens)",
                    what, tok.truncated, len(tok), max_tokens)
    return tok


class Collate:
    """Stacks images and pads captions to the batch's longest one (attention_mask 1 on real tokens).
    `pin_images`: the images are gathered straight into pinned memory (one copy; the DataLoader's
    pin_memory step then has nothing left to copy), ready for an asynchronous copy to the GPU."""

    def __init__(self, pad_id: int, pin_images: bool = False):
        self.pad_id = int(pad_id)
        self.pin_images = bool(pin_images)

    def __call__(self, items: list[dict | None]) -> dict[str, torch.Tensor]:
        items = [x for x in items if x is not None]
        if not items:
            return {"images": torch.empty(0), "indices": torch.empty(0, dtype=torch.long)}
        out = {}
        if "image" in items[0]:
            images = [x["image"] for x in items]
            pinned = torch.empty((len(images), *images[0].shape), dtype=images[0].dtype,
                                 pin_memory=True) if self.pin_images else None
            out["images"] = torch.stack(images, out=pinned)
        if "input_ids" in items[0]:
            seqs = [x["input_ids"] for x in items]
            length = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), length), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(seqs), length), dtype=torch.long)
            for i, s in enumerate(seqs):
                ids[i, :len(s)] = s
                mask[i, :len(s)] = 1
            out["input_ids"], out["attention_mask"] = ids, mask
            out["lengths"] = torch.tensor([len(s) for s in seqs], dtype=torch.long)  # stays on the CPU
        for key, name in (("label", "labels"), ("image_index", "image_indices"), ("index", "indices")):
            if key in items[0]:
                out[name] = torch.tensor([x[key] for x in items], dtype=torch.long)
        return out


# ---------------------------------------------------------------------------------------------------
# images


class _DecodeResize(Dataset):
    """Decodes and resizes one image to uint8 (3, H, W); a bad file gives zeros and ok=False."""

    def __init__(self, paths: Sequence[Path], image_size: Sequence[int], interpolation: str):
        self.paths, self.resize = list(paths), resize_transform(image_size, interpolation)
        self.shape = (3, *image_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return pil_to_tensor(self.resize(load_rgb(self.paths[i]))), True
        except DECODE_ERRORS as e:
            log.warning("image cache: cannot decode %s (%s: %s)", self.paths[i], type(e).__name__, e)
            return torch.zeros(self.shape, dtype=torch.uint8), False


class ImageCache:
    """Every image decoded once and resized to the model's input size, as one uint8 tensor (N, 3, H, W).
    Augmentation then runs on the device (`DeviceAugment`). `ok[i]` is False for undecodable files."""

    def __init__(self, paths: Sequence[Path], image_size: Sequence[int], interpolation: str = "bicubic",
                 num_workers: int = 0, progress: bool = True):
        self.row = {Path(p): i for i, p in enumerate(paths)}
        self.images = torch.empty((len(paths), 3, *image_size), dtype=torch.uint8)
        self.ok = torch.ones(len(paths), dtype=torch.bool)
        loader = DataLoader(_DecodeResize(paths, image_size, interpolation), batch_size=64, num_workers=num_workers)
        start = 0
        for images, ok in tqdm(loader, desc="decoding images into the cache", unit="batch", disable=not progress):
            self.images[start:start + len(images)] = images
            self.ok[start:start + len(images)] = ok
            start += len(images)
        self.failures = int((~self.ok).sum())
        if self.failures:
            log.warning("image cache: %d of %d images could not be decoded (see the warnings above)",
                        self.failures, len(paths))

    def rows(self, paths: Sequence[Path]) -> np.ndarray:
        return np.array([self.row[Path(p)] for p in paths], dtype=np.int64)


class _ImageDataset(Dataset):
    """Shared image loading: from the cache (uint8 at the resize size) or from the file through
    `transform` (normalised float). Decode failures are logged with the file and counted."""

    def __init__(self, paths: Sequence[Path], transform: Callable | None, cache: ImageCache | None,
                 records: Sequence[Record] = ()):
        if (transform is None) == (cache is None):
            raise ValueError("pass exactly one of transform / cache")
        self.paths = [Path(p) for p in paths]
        self.transform, self.cache = transform, cache
        self.cache_rows = cache.rows(self.paths) if cache is not None else None
        # record index in the annotation file of each image (-1: not from an annotation file)
        self.record_index = np.array([r.index for r in records] if records else [-1] * len(self.paths), dtype=np.int64)
        # Shared memory, created before any worker starts, so every worker's counts land here. failed[i]
        # is written only by the worker decoding image i; two workers failing on the same image in the same
        # instant could lose one count, never the fact that it failed.
        self.failures = torch.zeros(1, dtype=torch.int64).share_memory_()
        self.failed = torch.zeros(len(self.paths), dtype=torch.int32).share_memory_()

    def load_image(self, i: int) -> torch.Tensor | None:
        if self.cache is not None:
            row = self.cache_rows[i]
            if self.cache.ok[row]:
                return self.cache.images[row]
            if i < len(self.failed):
                self.failed[i] += 1
            return None
        try:
            return self.transform(load_rgb(self.paths[i]))
        except DECODE_ERRORS as e:
            self.failures += 1
            if i < len(self.failed):  # a caller may narrow `paths` after construction (search's incremental build)
                self.failed[i] += 1
            log.warning("cannot decode %s (%s: %s)", self.paths[i], type(e).__name__, e)
            return None

    def failure_problems(self, file: str, split: str, action: str, effect: str) -> list[Problem]:
        """One Problem per image that failed to decode so far: record, path, reason, how often."""
        out = []
        for i in torch.nonzero(self.failed[:len(self.paths)]).flatten().tolist():
            path, n = self.paths[i], int(self.failed[i])
            if self.cache is not None:
                reason = "undecodable when the image cache was built"
            else:
                try:
                    load_rgb(path)
                    reason = "failed to decode at the time, decodes now"
                except DECODE_ERRORS as e:
                    reason = f"{type(e).__name__}: {e}".replace(f"'{path}'", "").replace(str(path), "").rstrip()
            index = int(self.record_index[i])
            shown = _shown(path) if index >= 0 else str(path)
            out.append(Problem("decode_failure", action, file, index if index >= 0 else None,
                               f"{split}: {shown} could not be decoded {n} time(s) ({reason}); {effect}"))
        return out


def _shown(path: Path) -> str:
    """imgs/<path inside the dataset's image folder>, as the annotation reader names images."""
    parts = path.parts
    k = max((i for i, part in enumerate(parts) if part == IMAGE_DIR), default=None)
    return "/".join(parts[k:]) if k is not None else str(path)


def _records_with_images(records: list[Record], cache: ImageCache | None, what: str) -> list[Record]:
    """With a cache, training pairs of undecodable images are dropped up front (and reported)."""
    if cache is None:
        return records
    kept = [r for r in records if cache.ok[cache.row[r.image_path]]]
    if len(kept) < len(records):
        log.warning("%s: %d images could not be decoded; their records are left out", what, len(records) - len(kept))
    return kept


class TrainPairs(_ImageDataset):
    """One item per caption (the official sampling: an image appears once per caption); label = the
    remapped person id. An undecodable image is replaced by another pair (counted in `failures`)."""

    def __init__(self, records: list[Record], tokenizer, max_caption_tokens: int, transform: Callable | None = None,
                 cache: ImageCache | None = None):
        self.left_out = [r for r in records if cache is not None and not cache.ok[cache.row[r.image_path]]]
        records = _records_with_images(records, cache, "train")
        super().__init__([r.image_path for r in records], transform, cache, records)
        self.record_of = np.repeat(np.arange(len(records)), [len(r.captions) for r in records])
        self.first_pair = np.concatenate([[0], np.cumsum([len(r.captions) for r in records])[:-1]]).astype(np.int64)
        self.labels = np.array([r.person_id for r in records], dtype=np.int64)[self.record_of]
        self.tokens = _tokenize([c for r in records for c in r.captions], tokenizer, max_caption_tokens, "train")

    @property
    def caption_record_index(self) -> np.ndarray:
        """Record index (in the annotation file) of every pair's caption."""
        return self.record_index[self.record_of]

    def __len__(self) -> int:
        return len(self.record_of)

    def __getitem__(self, i: int) -> dict:
        j = i
        n = len(self.first_pair)
        for _ in range(_MAX_SUBSTITUTIONS):
            rec = int(self.record_of[j])
            image = self.load_image(rec)
            if image is not None:
                return {"image": image, "input_ids": self.tokens[j], "label": int(self.labels[j]), "index": j}
            j = int(self.first_pair[(rec + 1 + 7919 % max(n - 1, 1)) % n])  # another image, far away, deterministic
        raise DataError(f"{_MAX_SUBSTITUTIONS} training images in a row could not be decoded "
                        f"(last: {self.paths[self.record_of[j]]}); is the image folder complete?")


class EvalImages(_ImageDataset):
    """One item per gallery image, with its person id. An undecodable image becomes a blank image (zeros
    after normalisation) so that gallery indices stay aligned; it is counted in `failures`."""

    def __init__(self, records: list[Record], *, blank: torch.Tensor, transform: Callable | None = None,
                 cache: ImageCache | None = None):
        super().__init__([r.image_path for r in records], transform, cache, records)
        self.pids = torch.tensor([r.person_id for r in records], dtype=torch.long)
        self.blank = blank

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        image = self.load_image(i)
        if image is None:
            image = self.blank
        return {"image": image, "label": int(self.pids[i]), "index": i}


class EvalCaptions(Dataset):
    """One item per caption of an evaluation split: person id and the index of its own image (in the
    matching EvalImages), as the official `caption_matching_img_index`."""

    def __init__(self, records: list[Record], tokenizer, max_caption_tokens: int, what: str = "test"):
        self.pids = torch.tensor([r.person_id for r in records for _ in r.captions], dtype=torch.long)
        self.image_index = torch.tensor([i for i, r in enumerate(records) for _ in r.captions], dtype=torch.long)
        self.tokens = _tokenize([c for r in records for c in r.captions], tokenizer, max_caption_tokens, what)
        self.caption_record_index = np.array([r.index for r in records], dtype=np.int64)[self.image_index.numpy()]

    def __len__(self) -> int:
        return len(self.pids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.tokens[i], "label": int(self.pids[i]), "image_index": int(self.image_index[i]),
                "index": i}


class ImageFolderSet(_ImageDataset):
    """Every image under a folder (recursively, sorted paths) for person search. Undecodable images are
    left out of their batch (the batch's `indices` say which remain) and counted in `failures`."""

    def __init__(self, folder: str | Path, transform: Callable):
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise DataError(f"image folder not found: {folder}")
        paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not paths:
            raise DataError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
        super().__init__(paths, transform, None)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict | None:
        image = self.load_image(i)
        return None if image is None else {"image": image, "index": i}


# ---------------------------------------------------------------------------------------------------
# loaders


@dataclass
class EvalSplit:
    """Gallery images and query captions of one evaluation split, with the ground truth."""

    name: str
    images: EvalImages
    captions: EvalCaptions
    image_loader: DataLoader
    caption_loader: DataLoader

    @property
    def image_pids(self) -> torch.Tensor:
        return self.images.pids

    def problems(self, file: str) -> list[Problem]:
        """Gallery images substituted by blanks and truncated captions so far, named by record."""
        return (self.images.failure_problems(file, self.name, "substituted", "a blank image took its place in "
                                             "the gallery") + _truncation_problems(self.captions, file, self.name))

    @property
    def caption_pids(self) -> torch.Tensor:
        return self.captions.pids

    @property
    def caption_image_index(self) -> torch.Tensor:
        return self.captions.image_index


@dataclass
class DataLoaders:
    """What the engine trains and evaluates with. Batches' images go through `prepare` on the device:
    without the cache they are already normalised floats (prepare is the identity); with the cache they
    are uint8 and `prepare` augments (train) or only normalises (eval) them there."""

    train: DataLoader
    train_set: TrainPairs
    val: EvalSplit | None
    test: EvalSplit
    augment: DeviceAugment | None
    sampler: EpochSampler
    cache: ImageCache | None

    def prepare(self, images: torch.Tensor, train: bool) -> torch.Tensor:
        if self.augment is None:
            return images
        self.augment.to(images.device)
        return self.augment(images) if train else self.augment.normalize(images)

    def set_epoch(self, epoch: int) -> None:
        """Call at the start of every epoch: reshuffles the sampler and reseeds DeviceAugment."""
        self.sampler.set_epoch(epoch)
        if self.augment is not None:
            self.augment.set_epoch(epoch)

    def _parts(self) -> list[tuple[str, object, object]]:
        parts = [("train", self.train_set, self.train_set)]
        return parts + [(s.name, s.images, s.captions) for s in (self.val, self.test) if s is not None]

    def problems(self, file: str) -> list[Problem]:
        """Every record the loaders skipped, substituted or truncated so far, named by `file` (the
        annotation file name) and record index: train records left out by the image cache, images that
        failed to decode (training pairs replaced by others, gallery images by blanks), truncated captions."""
        out = [Problem("decode_failure", "skipped", file, r.index,
                       f"train: {_shown(r.image_path)} could not be decoded into the image cache; its pairs are left out")
               for r in getattr(self.train_set, "left_out", [])]
        for name, images, captions in self._parts():
            effect = "each time another training pair was used" if name == "train" else \
                "a blank image took its place in the gallery"
            out += images.failure_problems(file, name, "substituted", effect)
            out += _truncation_problems(captions, file, name)
        return out

    def failure_counts(self) -> dict[str, torch.Tensor]:
        """Per-image decode failure counts of every split (saved with the training state)."""
        return {name: images.failed for name, images, _ in self._parts()}

    def add_failure_counts(self, counts: dict[str, torch.Tensor]) -> None:
        """Add counts of an earlier session (a resumed run) or of other ranks, matched by split and size."""
        mine = self.failure_counts()
        for name, c in counts.items():
            if name in mine and c.shape == mine[name].shape:
                mine[name] += c.to(mine[name].dtype)

    def report(self) -> str:
        """Counted truncations and decode failures so far ('' when there were none)."""
        lines = []
        if self.cache is not None and self.cache.failures:
            lines.append(f"image cache: {self.cache.failures} undecodable images (train pairs left out, "
                         "evaluation images blank)")
        for name, images, captions in self._parts():
            n = int(images.failed.sum())
            if n:
                lines.append(f"{name}: {n} image decode failures in {int((images.failed > 0).sum())} images "
                             "(substituted; named in the data report)")
            if captions.tokens.truncated:
                lines.append(f"{name}: {captions.tokens.truncated} captions truncated to "
                             f"{captions.tokens.max_tokens} tokens")
        return "\n".join(lines)


def _truncation_problems(captions, file: str, name: str) -> list[Problem]:
    index, tokens = captions.caption_record_index, captions.tokens
    return [Problem("truncated_caption", "fixed", file, int(index[row]),
                    f"{name}: a caption of this record was truncated to {tokens.max_tokens} tokens")
            for row in tokens.truncated_rows.tolist()]


def _image_collate(cfg, tokenizer, cache: ImageCache | None) -> Collate:
    """With the cache (loaded in the main process) on a CUDA machine: batches gathered into pinned memory."""
    pin = cache is not None and bool(cfg.data.pin_memory) and torch.cuda.is_available()
    return Collate(tokenizer.pad_token_id, pin_images=pin)


def _loader_options(cfg, cache: ImageCache | None, num_workers: int | None = None) -> dict:
    """Worker settings of the image loaders (`num_workers`, default data.num_workers). With the cache an
    item is a tensor slice: worker processes would only add overhead, so it is loaded in the main process."""
    dc = cfg.data
    n = 0 if cache is not None else int(dc.num_workers if num_workers is None else num_workers)
    return dict(num_workers=n, pin_memory=bool(dc.pin_memory) and torch.cuda.is_available(),
                persistent_workers=bool(dc.persistent_workers) and n > 0)


def build_eval_split(name: str, records: list[Record], tokenizer, cfg, mean: Sequence[float], std: Sequence[float],
                     cache: ImageCache | None = None, batch_size: int | None = None,
                     num_workers: int | None = None) -> EvalSplit:
    """Gallery images + query captions of any records (e.g. another dataset's test split for
    cross-domain evaluation), prepared with the test transform (or from `cache`) and the tokenizer.
    For a trained model pass its own preprocessing: model.tokenizer, model.image_mean, model.image_std
    (with its checkpoint's cfg for the image size). batch_size: default eval.batch_size; num_workers:
    image-loading processes, default data.num_workers."""
    dc = cfg.data
    if cache is None:
        images = EvalImages(records, transform=build_test_transform(dc.image_size, mean, std, dc.interpolation),
                            blank=torch.zeros(3, *dc.image_size))
    else:  # blank = the mean colour, which normalises to zeros like the uncached blank
        blank = (torch.tensor(mean) * 255).round().to(torch.uint8).view(3, 1, 1).expand(3, *dc.image_size).clone()
        images = EvalImages(records, cache=cache, blank=blank)
    captions = EvalCaptions(records, tokenizer, dc.max_caption_tokens, name)
    collate = Collate(tokenizer.pad_token_id)
    bs = batch_size or cfg.eval.batch_size
    return EvalSplit(name, images, captions,
                     DataLoader(images, batch_size=bs, shuffle=False, collate_fn=_image_collate(cfg, tokenizer, cache),
                                **_loader_options(cfg, cache, num_workers)),
                     DataLoader(captions, batch_size=bs, shuffle=False, collate_fn=collate))


def build_loaders(cfg, annotations: Annotations, tokenizer, mean: Sequence[float], std: Sequence[float],
                  distributed: bool = False, progress: bool = True) -> DataLoaders:
    """Train loader plus val (where the dataset has one) and test evaluation splits. The train loader is
    the resumable one of lgur.data.sampling: shuffled per epoch from cfg.seed, drop_last, each of the
    world_size processes (`distributed`) getting optim.batch_size / world_size, items seeded by
    (seed, epoch, index). mean/std are the image backbone's normalisation (model.image_mean / image_std)."""
    dc = cfg.data
    world, rank = 1, 0
    if distributed:
        world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    if cfg.optim.batch_size % world:
        raise ConfigError(f"optim.batch_size={cfg.optim.batch_size} is not divisible by {world} processes")
    eval_records = annotations.val + annotations.test
    cache = augment = None
    if dc.cache_images:
        paths = list(dict.fromkeys(r.image_path for r in annotations.train + eval_records))
        cache = ImageCache(paths, dc.image_size, dc.interpolation, dc.num_workers, progress and rank == 0)
        augment = DeviceAugment(mean, std, dc.pad, dc.flip, seed=cfg.seed + rank)
        train_set = TrainPairs(annotations.train, tokenizer, dc.max_caption_tokens, cache=cache)
    else:
        transform = build_train_transform(dc.image_size, mean, std, dc.pad, dc.flip, dc.interpolation)
        train_set = TrainPairs(annotations.train, tokenizer, dc.max_caption_tokens, transform=transform)

    train, sampler = resumable_loader(train_set, cfg.optim.batch_size // world, world, rank, cfg.seed,
                                      _image_collate(cfg, tokenizer, cache), **_loader_options(cfg, cache))
    if len(train) == 0:
        raise DataError(f"{len(train_set)} training captions make no full batch of {cfg.optim.batch_size // world}")
    val = build_eval_split("val", annotations.val, tokenizer, cfg, mean, std, cache) if annotations.val else None
    test = build_eval_split("test", annotations.test, tokenizer, cfg, mean, std, cache)
    return DataLoaders(train, train_set, val, test, augment, sampler, cache)
