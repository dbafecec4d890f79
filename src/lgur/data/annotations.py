"""Annotation readers for CUHK-PEDES, ICFG-PEDES and RSTPReid into one `Record` type.

Every public copy of these datasets is a JSON list of per-image records next to an `imgs/` folder
(field.md §2.5, lgur-reference.md §4):

    layout      annotation file                          image field   split
    cuhk-pedes  reid_raw.json                            file_path     `split` field (train/val/test)
    cuhk-pedes  caption_all.json (some copies)           file_path     none: by identity, see below
    icfg-pedes  ICFG-PEDES.json or ICFG_PEDES.json       file_path     `split` field (not the folders)
    rstpreid    data_captions.json                       img_path      `split` field

Bad records are skipped and reported in `Annotations.problems` (file + record index, never silently);
problems that make the data unusable raise `DataError` before any training starts.
"""
from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from lgur.data.images import verify_image
from lgur.errors import DataError

SPLITS = ("train", "val", "test")
# accepted spellings of the three split names (case-insensitive)
_SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}

# annotation file name -> (layout, image field); the order is the preference when a folder has several
ANNOTATION_FILES = {
    "reid_raw.json": ("cuhk-pedes", "file_path"),
    "caption_all.json": ("cuhk-pedes", "file_path"),
    "ICFG-PEDES.json": ("icfg-pedes", "file_path"),
    "ICFG_PEDES.json": ("icfg-pedes", "file_path"),
    "data_captions.json": ("rstpreid", "img_path"),
}
IMAGE_DIR = "imgs"

# The standard CUHK-PEDES split (Li et al. 2017; used by every later paper) is by identity: ids sorted,
# the first 11,003 train, the next 1,000 val, the last 1,000 test. `caption_all.json` has no split field,
# so we rebuild it; for a copy with a different number of ids the same proportions are used.
CUHK_SPLIT_IDS = {"train": 11003, "val": 1000, "test": 1000}
CUHK_SPLIT_RULE = ("by identity, the standard CUHK-PEDES split: ids in ascending order, "
                   "first 11,003 train / next 1,000 val / last 1,000 test")


@dataclass(frozen=True)
class Record:
    """One image with its captions. `person_id` is the training label (train: remapped to 0..N-1 in
    order of first appearance; val/test: the raw id); `index` is the record's position in the file."""

    image_path: Path
    person_id: int
    captions: list[str]
    split: str
    raw_id: int
    index: int


@dataclass(frozen=True)
class Problem:
    """One finding about the data. action: 'skipped' (record dropped), 'fixed' (kept after a repair,
    e.g. an empty caption removed) or 'note' (nothing changed, worth knowing)."""

    kind: str
    action: str
    file: str
    index: int | None
    message: str

    def __str__(self) -> str:
        where = f"{self.file} record #{self.index}" if self.index is not None else self.file
        return f"{where}: {self.message}"


@dataclass
class Problems:
    """All problems found while reading a dataset, grouped by kind for the report."""

    items: list[Problem] = field(default_factory=list)

    def add(self, kind: str, action: str, file: str, index: int | None, message: str) -> None:
        self.items.append(Problem(kind, action, file, index, message))

    def __len__(self) -> int:
        return len(self.items)

    def counts(self) -> dict[str, int]:
        return dict(Counter(p.kind for p in self.items))

    def skipped_records(self) -> int:
        return len({(p.file, p.index) for p in self.items if p.action == "skipped"})

    def format(self, examples: int = 5) -> str:
        """Grouped report: one header per kind with its count, then the first `examples` messages."""
        if not self.items:
            return "no problems found"
        groups: dict[tuple[str, str], list[Problem]] = defaultdict(list)
        for p in self.items:
            groups[(p.kind, p.action)].append(p)
        lines = []
        for (kind, action), ps in groups.items():
            verb = {"skipped": "records skipped", "fixed": "fixed", "note": "noted"}[action]
            lines.append(f"  {kind}: {len(ps)} {verb}")
            lines += [f"    {p}" for p in ps[:examples]]
            if len(ps) > examples:
                lines.append(f"    ... and {len(ps) - examples} more")
        return "\n".join(lines)


@dataclass
class Annotations:
    """A dataset's records by split plus everything found wrong while reading it."""

    layout: str
    annotation_file: Path
    image_root: Path
    split_rule: str
    train: list[Record]
    val: list[Record]
    test: list[Record]
    num_train_ids: int
    total_records: int
    problems: Problems
    dropped_train_ids: int = 0

    def split(self, name: str) -> list[Record]:
        return {"train": self.train, "val": self.val, "test": self.test}[name]

    def counts(self) -> dict[str, dict[str, int]]:
        return {s: {"images": len(rs), "captions": sum(len(r.captions) for r in rs),
                    "ids": len({r.person_id for r in rs})} for s in SPLITS for rs in [self.split(s)]}

    def bad_fraction(self) -> float:
        return self.problems.skipped_records() / max(self.total_records, 1)

    def raise_if_unusable(self, max_bad_fraction: float) -> None:
        """Refuse data that cannot train or evaluate: too many bad records, or no train/test records."""
        name = self.annotation_file.name
        if self.bad_fraction() > max_bad_fraction:
            raise DataError(
                f"{self.annotation_file}: {self.problems.skipped_records()} of {self.total_records} records "
                f"are unusable ({self.bad_fraction():.1%} > data.max_bad_fraction={max_bad_fraction:.1%}); "
                f"problems: {self.problems.counts()}; run `lgur data-check {self.annotation_file.parent}`")
        for s in ("train", "test"):
            if not self.split(s):
                raise DataError(f"{name}: no usable '{s}' records (problems: {self.problems.counts()})")


def find_annotation_file(root: str | Path) -> Path:
    """The annotation file of a dataset root folder, or `root` itself when it is an annotation file."""
    root = Path(root).expanduser()
    if root.is_file():
        if root.name not in ANNOTATION_FILES:
            raise DataError(f"{root}: unknown annotation file name (accepted: {', '.join(ANNOTATION_FILES)})")
        return root
    if not root.is_dir():
        raise DataError(f"dataset root not found: {root}")
    for name in ANNOTATION_FILES:
        if (root / name).is_file():
            return root / name
    found = sorted(p.name for p in root.glob("*.json"))
    raise DataError(f"{root}: no annotation file (expected one of {', '.join(ANNOTATION_FILES)}; "
                    f"json files here: {', '.join(found) or 'none'})")


def _read_json_list(path: Path) -> list:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    if not isinstance(data, list):
        what = f"an object with keys {sorted(data)[:8]}" if isinstance(data, dict) else type(data).__name__
        raise DataError(f"{path}: expected a JSON list of image records, got {what}")
    return data


@dataclass
class _Raw:
    """A record that passed the field checks; the split may still be assigned later."""

    index: int
    raw_id: int
    rel_path: str
    captions: list[str]
    split: str | None


def _parse(items: list, image_field: str, has_split: bool, file: str, problems: Problems) -> list[_Raw]:
    """Field checks, one record at a time; bad records are skipped with a message."""
    out = []
    needed = ("id", image_field, "captions") + (("split",) if has_split else ())
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            problems.add("bad_record", "skipped", file, i, f"not a JSON object ({type(item).__name__})")
            continue
        missing = [k for k in needed if k not in item]
        if missing:
            problems.add("missing_field", "skipped", file, i, f"missing field(s) {', '.join(missing)}")
            continue
        pid, rel, caps = item["id"], item[image_field], item["captions"]
        if isinstance(pid, bool) or not isinstance(pid, int):
            problems.add("bad_field", "skipped", file, i, f"'id' must be an integer, got {pid!r}")
            continue
        if not isinstance(rel, str) or not rel.strip() or os.path.isabs(rel) or ".." in Path(rel).parts:
            problems.add("bad_field", "skipped", file, i, f"'{image_field}' must be a relative path, got {rel!r}")
            continue
        if not isinstance(caps, list):
            problems.add("bad_field", "skipped", file, i, f"'captions' must be a list, got {type(caps).__name__}")
            continue
        split = None
        if has_split:
            split = _SPLIT_ALIASES.get(str(item["split"]).strip().lower())
            if split is None:
                problems.add("unknown_split", "skipped", file, i,
                             f"unknown split {item['split']!r} (expected train, val or test)")
                continue
        kept = [c.strip() for c in caps if isinstance(c, str) and c.strip()]
        if len(kept) < len(caps):
            action = "fixed" if kept else "skipped"
            problems.add("empty_caption", action, file, i,
                         f"{len(caps) - len(kept)} of {len(caps)} captions empty or not text"
                         + ("" if kept else "; no caption left"))
            if not kept:
                continue
        out.append(_Raw(i, pid, rel.strip(), kept, split))
    return out


def _split_by_identity(raws: list[_Raw], file: str, problems: Problems) -> None:
    """Assign splits by identity for files without a split field (standard CUHK-PEDES rule)."""
    ids = sorted({r.raw_id for r in raws})
    n = len(ids)
    total = sum(CUHK_SPLIT_IDS.values())
    n_test = round(n * CUHK_SPLIT_IDS["test"] / total)  # exactly 1,000 for the real 13,003 ids
    n_val = round(n * CUHK_SPLIT_IDS["val"] / total)
    if n >= 3:  # keep every split non-empty on small copies
        n_test, n_val = max(n_test, 1), max(n_val, 1)
    if n != total:
        problems.add("split_rule", "note", file, None,
                     f"{n} identities instead of the standard {total}: split {n - n_val - n_test}/{n_val}/{n_test} "
                     "ids (train/val/test) in the standard proportions")
    where = {pid: ("train" if k < n - n_val - n_test else "val" if k < n - n_test else "test")
             for k, pid in enumerate(ids)}
    for r in raws:
        r.split = where[r.raw_id]


def _note_id_gaps(raws: list[_Raw], file: str, problems: Problems, examples: int = 5) -> None:
    """Raw ids that skip numbers: harmless (train ids are remapped) but often a sign of a partial copy."""
    first_index = {}
    for r in raws:
        first_index.setdefault(r.raw_id, r.index)
    ids = sorted(first_index)
    gaps = [(a, b) for a, b in zip(ids, ids[1:]) if b - a > 1]
    for a, b in gaps[:examples]:
        problems.add("id_gap", "note", file, first_index[b],
                     f"ids jump from {a} to {b} ({b - a - 1} missing); train ids are remapped to 0..N-1")
    if len(gaps) > examples:
        problems.add("id_gap", "note", file, None, f"{len(gaps) - examples} more id gaps")


def _note_split_overlap(raws: list[_Raw], file: str, problems: Problems) -> None:
    splits_of: dict[int, set[str]] = defaultdict(set)
    for r in raws:
        splits_of[r.raw_id].add(r.split)
    shared = sorted(pid for pid, s in splits_of.items() if len(s) > 1)
    if shared:
        problems.add("split_overlap", "note", file, None,
                     f"{len(shared)} ids appear in more than one split (e.g. {shared[:5]}): evaluation may leak")


def load_annotations(root: str | Path, skip_train_ids: Iterable[int] = (), max_bad_fraction: float | None = 0.01,
                     verify_images: bool = False, progress: bool = False) -> Annotations:
    """Read a dataset (root folder or annotation file), check it, and return its records by split.

    skip_train_ids: raw train ids to drop (the official CUHK script drops 1369, 4116, 6116).
    max_bad_fraction: raise DataError when more records than this are unusable; None = only report.
    verify_images: also open every image (header, PIL verify, JPEG end marker) instead of only checking
    that the file exists. `lgur data-check` does; training relies on the loaders' decode-failure handling.
    Typical use: `load_annotations(cfg.data.root, cfg.data.skip_train_ids, cfg.data.max_bad_fraction)`.
    """
    ann_file = find_annotation_file(root)
    layout, image_field = ANNOTATION_FILES[ann_file.name]
    image_root = ann_file.parent / IMAGE_DIR
    if not image_root.is_dir():
        raise DataError(f"image folder not found: {image_root} (images go under {IMAGE_DIR}/ next to {ann_file.name})")
    items = _read_json_list(ann_file)
    problems = Problems()
    file = ann_file.name
    has_split = ann_file.name != "caption_all.json"
    raws = _parse(items, image_field, has_split, file, problems)
    if has_split:
        rule = "the 'split' field of each record"
    else:
        rule = CUHK_SPLIT_RULE
        _split_by_identity(raws, file, problems)
    _note_id_gaps(raws, file, problems)
    _note_split_overlap(raws, file, problems)
    raws = _check_images(raws, image_root, verify_images, file, problems, progress)

    skip = {int(i) for i in skip_train_ids}
    by_split: dict[str, list[Record]] = {s: [] for s in SPLITS}
    remap: dict[int, int] = {}
    dropped = 0
    for r in raws:
        if r.split == "train":
            if r.raw_id in skip:
                dropped += 1
                continue
            label = remap.setdefault(r.raw_id, len(remap))
        else:
            label = r.raw_id
        by_split[r.split].append(Record(image_root / r.rel_path, label, r.captions, r.split, r.raw_id, r.index))
    ann = Annotations(layout, ann_file, image_root, rule, by_split["train"], by_split["val"], by_split["test"],
                      len(remap), len(items), problems, dropped)
    if max_bad_fraction is not None:
        ann.raise_if_unusable(max_bad_fraction)
    return ann


def _check_images(raws: list[_Raw], image_root: Path, verify: bool, file: str, problems: Problems,
                  progress: bool) -> list[_Raw]:
    from tqdm import tqdm

    kept = []
    for r in tqdm(raws, desc="checking images", unit="img", disable=not progress, mininterval=1.0):
        path = image_root / r.rel_path
        if not path.is_file():
            problems.add("missing_image", "skipped", file, r.index, f"image not found: {IMAGE_DIR}/{r.rel_path}")
            continue
        if verify:
            error = verify_image(path)
            if error:
                problems.add("corrupt_image", "skipped", file, r.index, f"{IMAGE_DIR}/{r.rel_path}: {error}")
                continue
        kept.append(r)
    return kept


def caption_token_lengths(captions: Sequence[str], tokenizer) -> list[int]:
    """Token counts including special tokens, as the datasets see them before truncation."""
    n_special = tokenizer.num_special_tokens_to_add()
    ids = tokenizer(list(captions), add_special_tokens=False, verbose=False)["input_ids"]
    return [len(x) + n_special for x in ids]
