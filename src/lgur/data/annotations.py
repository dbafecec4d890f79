"""Annotation readers for CUHK-PEDES, ICFG-PEDES and RSTPReid into one `Record` type.

Every public copy of these datasets is a JSON list of per-image records next to an `imgs/` folder
(docs/reference.md §4):

    layout      annotation file                          image field   split
    cuhk-pedes  reid_raw.json                            file_path     `split` field (train/val/test)
    cuhk-pedes  caption_all.json (some copies)           file_path     none: by identity, see below
    icfg-pedes  ICFG-PEDES.json or ICFG_PEDES.json       file_path     `split` field (not the folders)
    rstpreid    data_captions.json                       img_path      `split` field

Bad records are skipped and reported in `Annotations.problems` (file + record index, never silently);
problems that make the data unusable raise `DataError` before any training starts. Duplicate image paths
within a split and images in two splits (train/test leakage) are found here too (kinds `duplicate_image`
and `image_in_two_splits`, compared by resolved path, so symlinks and `a/../b` spellings count);
training refuses them unless `data.allow_duplicate_images` is set. `Annotations.report()` is the
summary a run logs and writes to results.json: records, images and captions in and used, every problem.
"""
from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from tqdm import tqdm

from lgur.data.images import verify_image
from lgur.errors import DataError

SPLITS = ("train", "val", "test")
DUPLICATE_KINDS = ("duplicate_image", "image_in_two_splits")
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
    e.g. an empty caption removed or a long caption truncated), 'substituted' (an undecodable image replaced
    at load time: another training pair, or a blank gallery image), 'excluded' (dropped on request:
    data.skip_train_ids) or 'note' (nothing changed, worth knowing)."""

    kind: str
    action: str
    file: str
    index: int | None
    message: str

    def __str__(self) -> str:
        where = f"{self.file} record #{self.index}" if self.index is not None else self.file
        return f"{where}: {self.message}"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "action": self.action, "file": self.file, "record": self.index,
                "message": self.message}


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

    def extend(self, items: Iterable[Problem]) -> None:
        self.items.extend(items)

    def skipped_records(self) -> int:
        return self.records_with("skipped")

    def records_with(self, action: str) -> int:
        return len({(p.file, p.index) for p in self.items if p.action == action})

    def format(self, examples: int | None = 5, every: tuple[str, ...] = ()) -> str:
        """Grouped report: one header per kind with its count, then the first `examples` messages (all
        of them for kinds whose action is in `every`, or when examples is None)."""
        if not self.items:
            return "no problems found"
        groups: dict[tuple[str, str], list[Problem]] = defaultdict(list)
        for p in self.items:
            groups[(p.kind, p.action)].append(p)
        lines = []
        for (kind, action), ps in groups.items():
            verb = {"skipped": "records skipped", "fixed": "fixed", "note": "noted",
                    "substituted": "records substituted", "excluded": "records excluded on request"}[action]
            lines.append(f"  {kind}: {len(ps)} {verb}")
            shown = len(ps) if examples is None or action in every else examples
            lines += [f"    {p}" for p in ps[:shown]]
            if len(ps) > shown:
                lines.append(f"    ... and {len(ps) - shown} more")
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
    images_in: int = 0              # distinct image paths named by the file's records
    captions_in: int = 0            # captions in the file's records (those with a caption list)

    def split(self, name: str) -> list[Record]:
        return {"train": self.train, "val": self.val, "test": self.test}[name]

    def counts(self) -> dict[str, dict[str, int]]:
        return {s: {"images": len({r.image_path for r in rs}), "captions": sum(len(r.captions) for r in rs),
                    "ids": len({r.person_id for r in rs})} for s in SPLITS for rs in [self.split(s)]}

    def bad_fraction(self) -> float:
        return self.problems.skipped_records() / max(self.total_records, 1)

    def duplicates(self) -> list[Problem]:
        """Duplicate images within a split and images in two splits (train/test leakage)."""
        return [p for p in self.problems.items if p.kind in DUPLICATE_KINDS]

    def raise_if_duplicates(self, allow: bool) -> None:
        """Refuse duplicate images and train/test leakage unless `allow` (data.allow_duplicate_images)."""
        found = self.duplicates()
        if found and not allow:
            counts = Counter(p.kind for p in found)
            raise DataError(
                f"{self.annotation_file}: " + ", ".join(f"{n} {k}" for k, n in counts.items())
                + f" (e.g. {found[0]}); duplicates weigh some images twice and an image in two splits leaks "
                "training data into evaluation. Fix the annotation file, or pass data.allow_duplicate_images=true "
                f"to train anyway; `lgur data-check {self.annotation_file.parent}` lists them all")

    def report(self, found: Sequence[Problem] = (), left_out: Sequence[Record] = (),
               splits: Sequence[str] = SPLITS) -> dict:
        """What a run logs and writes to results.json ("data"): records, images and captions in the file
        and used (by `splits`; minus the `left_out` records a loader could not use), every problem of the
        reader plus the loaders' `found` ones (file + record each), totals per action, and the text."""
        left = {(r.split, r.index) for r in left_out}
        by_split = {s: [r for r in self.split(s) if (s, r.index) not in left] for s in splits}

        def counts(rs: list[Record]) -> dict[str, int]:
            return {"records": len(rs), "images": len({r.image_path for r in rs}),
                    "captions": sum(len(r.captions) for r in rs)}

        problems = Problems(list(self.problems.items) + list(found))
        used = counts([r for rs in by_split.values() for r in rs])
        kinds = Counter(f"{p.kind} ({p.action})" for p in problems.items)
        loading = Counter(f"{p.kind} {p.action}" for p in found)
        report = {"annotation_file": str(self.annotation_file), "layout": self.layout,
                  "in": {"records": self.total_records, "images": self.images_in, "captions": self.captions_in},
                  "used": {**used, "splits": {s: counts(rs) for s, rs in by_split.items()}},
                  "records_skipped": problems.records_with("skipped"),
                  "records_substituted": problems.records_with("substituted"),
                  "records_excluded": problems.records_with("excluded"),
                  "problem_counts": dict(kinds), "problems": [p.to_dict() for p in problems.items]}
        i = report["in"]
        splits_text = ", ".join(f"{s} {c['records']}/{c['images']}/{c['captions']}"
                                for s, c in report["used"]["splits"].items())
        report["summary"] = (
            f"{self.annotation_file.name}: {i['records']} records, {i['images']} images, {i['captions']} captions in; "
            f"used {used['records']} records, {used['images']} images, {used['captions']} captions "
            f"(records/images/captions: {splits_text}); {report['records_skipped']} records skipped, "
            f"{report['records_substituted']} substituted, {report['records_excluded']} excluded on request"
            + ("; while loading: " + ", ".join(f"{n} {k}" for k, n in loading.items()) if loading else ""))
        report["text"] = problems.format(examples=5, every=("skipped", "substituted", "excluded"))
        return report

    def summary(self) -> str:
        """One line: what went in and what is used."""
        return self.report()["summary"]

    def raise_if_unusable(self, max_bad_fraction: float, splits: tuple[str, ...] = ("train", "test")) -> None:
        """Refuse data that cannot train or evaluate: too many bad records, or no records in one of
        `splits` (training needs train and test; evaluating one split needs only that one)."""
        name = self.annotation_file.name
        if self.bad_fraction() > max_bad_fraction:
            raise DataError(
                f"{self.annotation_file}: {self.problems.skipped_records()} of {self.total_records} records "
                f"are unusable ({self.bad_fraction():.1%} > data.max_bad_fraction={max_bad_fraction:.1%}); "
                f"problems: {self.problems.counts()}; run `lgur data-check {self.annotation_file.parent}`")
        for s in splits:
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


def _find_duplicate_images(records: list[Record], image_root: Path, file: str, problems: Problems) -> None:
    """Every record whose image (resolved path) an earlier record already uses: in the same split
    (duplicate_image) or in another one (image_in_two_splits: train/test leakage)."""
    first: dict[str, Record] = {}
    for r in records:
        try:
            key = os.path.normcase(str(r.image_path.resolve()))
        except (OSError, RuntimeError):  # a symlink loop: the path itself is the best identity left
            key = os.path.normcase(os.path.normpath(str(r.image_path)))
        seen = first.setdefault(key, r)
        if seen is r:
            continue
        rel = f"{IMAGE_DIR}/{r.image_path.relative_to(image_root).as_posix()}"
        if seen.split == r.split:
            problems.add("duplicate_image", "note", file, r.index,
                         f"{rel}: same image as record #{seen.index} (both {r.split})")
        else:
            problems.add("image_in_two_splits", "note", file, r.index,
                         f"{rel} ({r.split}): same image as record #{seen.index} ({seen.split}): leakage between "
                         "splits")


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
                problems.add("skip_train_ids", "excluded", file, r.index,
                             f"train id {r.raw_id} is in data.skip_train_ids ({IMAGE_DIR}/{r.rel_path})")
                continue
            label = remap.setdefault(r.raw_id, len(remap))
        else:
            label = r.raw_id
        by_split[r.split].append(Record(image_root / r.rel_path, label, r.captions, r.split, r.raw_id, r.index))
    _find_duplicate_images([r for s in SPLITS for r in by_split[s]], image_root, file, problems)
    images_in = {it[image_field].strip() for it in items if isinstance(it, dict) and isinstance(it.get(image_field), str)}
    captions_in = sum(len(it["captions"]) for it in items if isinstance(it, dict) and isinstance(it.get("captions"), list))
    ann = Annotations(layout, ann_file, image_root, rule, by_split["train"], by_split["val"], by_split["test"],
                      len(remap), len(items), problems, dropped, len(images_in), captions_in)
    if max_bad_fraction is not None:
        ann.raise_if_unusable(max_bad_fraction)
    return ann


def _check_images(raws: list[_Raw], image_root: Path, verify: bool, file: str, problems: Problems,
                  progress: bool) -> list[_Raw]:
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
