"""Torch data pipeline: tokenisation/collate, decode-failure handling, DeviceAugment vs the PIL path,
the image cache and build_loaders."""
from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import functional as F

from lgur.config import load_config
from lgur.data.annotations import Record, load_annotations
from lgur.data.datasets import (Collate, EvalCaptions, EvalImages, ImageCache, ImageFolderSet, TokenizedCaptions,
                                TrainPairs, build_loaders)
from lgur.data.transforms import DeviceAugment, build_test_transform, build_train_transform
from lgur.errors import DataError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIZE = (32, 16)


def _records(tmp_path: Path, n: int, broken: set[int] = frozenset(), split: str = "train") -> list[Record]:
    recs = []
    for i in range(n):
        p = tmp_path / f"{split}_{i}.jpg"
        Image.new("RGB", (20, 40), (10 * i, 100, 200)).save(p)
        if i in broken:
            p.write_bytes(p.read_bytes()[:200])  # truncated: the header parses, the decode fails
        recs.append(Record(p, i // 2, [f"caption {i} a", f"person {i} walks by"], split, i // 2, i))
    return recs


def test_tokenized_captions_truncate_and_count(tokenizer):
    caps = ["a man in a red shirt", "word " * 30, "hi"]
    tok = TokenizedCaptions(caps, tokenizer, max_tokens=12)
    assert tok.truncated == 1 and len(tok) == 3
    assert tok[0].tolist() == tokenizer(caps[0])["input_ids"]
    long = tok[1].tolist()
    assert len(long) == 12 and long[0] == tokenizer.cls_token_id and long[-1] == tokenizer.sep_token_id
    assert tok[2].dtype == torch.long


def test_collate_pads_to_longest_caption():
    items = [{"image": torch.full((3, 4, 2), float(k)), "input_ids": torch.arange(1, n + 1), "label": k, "index": 10 + k}
             for k, n in enumerate([3, 5, 2])]
    b = Collate(pad_id=0)(items)
    assert b["images"].shape == (3, 3, 4, 2) and b["images"][2].eq(2).all()
    assert b["input_ids"].shape == (3, 5) and b["input_ids"].dtype == torch.long
    assert b["input_ids"][2].tolist() == [1, 2, 0, 0, 0]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert b["labels"].tolist() == [0, 1, 2] and b["indices"].tolist() == [10, 11, 12]
    b = Collate(pad_id=7)([{"input_ids": torch.tensor([5]), "label": 3, "image_index": 4, "index": 0}, None])
    assert b["input_ids"].tolist() == [[5]] and b["image_indices"].tolist() == [4]
    assert Collate(0)([None, None])["indices"].numel() == 0


def test_train_pairs_substitute_undecodable_images(tmp_path, tokenizer):
    recs = _records(tmp_path, 4, broken={1})
    ds = TrainPairs(recs, tokenizer, 16, transform=build_train_transform(SIZE, MEAN, STD, pad=2))
    assert len(ds) == 8 and ds.labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    item = ds[2]  # first caption of the broken image: replaced by another pair
    assert item["index"] != 2 and ds.record_of[item["index"]] != 1 and int(ds.failures) == 1
    assert item["image"].shape == (3, *SIZE) and item["image"].dtype == torch.float32
    # a whole epoch with worker processes finishes, and the failures from every worker are counted
    ds.failures.zero_()
    loader = DataLoader(ds, batch_size=3, num_workers=2, collate_fn=Collate(tokenizer.pad_token_id))
    batches = list(loader)
    assert sum(len(b["labels"]) for b in batches) == 8
    assert int(ds.failures) == 2  # both captions of the broken image
    all_broken = TrainPairs(_records(tmp_path, 2, broken={0, 1}, split="dead"), tokenizer, 16,
                            transform=build_train_transform(SIZE, MEAN, STD))
    with pytest.raises(DataError, match="could not be decoded"):
        all_broken[0]


def test_eval_sets(tmp_path, tokenizer):
    recs = _records(tmp_path, 3, broken={2}, split="test")
    blank = torch.zeros(3, *SIZE)
    images = EvalImages(recs, transform=build_test_transform(SIZE, MEAN, STD), blank=blank)
    got = [images[i] for i in range(3)]
    assert [g["label"] for g in got] == [0, 0, 1] and [g["index"] for g in got] == [0, 1, 2]
    assert torch.equal(got[2]["image"], blank) and int(images.failures) == 1  # gallery size kept
    assert not torch.equal(got[0]["image"], blank)
    caps = EvalCaptions(recs, tokenizer, 16)
    assert len(caps) == 6 and caps.image_index.tolist() == [0, 0, 1, 1, 2, 2] and caps.pids.tolist() == [0, 0, 0, 0, 1, 1]
    assert caps[3]["input_ids"].tolist() == tokenizer("person 1 walks by")["input_ids"]


def test_image_folder_set_skips_bad_images(tmp_path):
    for i in range(3):
        Image.new("RGB", (20, 40), (50 * i, 0, 0)).save(tmp_path / f"{i}.png")
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (20, 40)).save(tmp_path / "sub" / "x.JPG")
    (tmp_path / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (tmp_path / "notes.txt").write_text("not an image")
    ds = ImageFolderSet(tmp_path, build_test_transform(SIZE, MEAN, STD))
    assert [p.name for p in ds.paths] == ["0.png", "1.png", "2.png", "x.JPG"]
    batches = list(DataLoader(ds, batch_size=2, collate_fn=Collate(0)))
    assert [b["indices"].tolist() for b in batches] == [[0], [2, 3]]
    assert batches[1]["images"].shape == (2, 3, *SIZE) and int(ds.failures) == 1
    with pytest.raises(DataError, match="image folder not found"):
        ImageFolderSet(tmp_path / "missing", build_test_transform(SIZE, MEAN, STD))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        ImageFolderSet(tmp_path / "empty", build_test_transform(SIZE, MEAN, STD))


# ------------------------------------------------------------------------------------------------
# DeviceAugment vs the PIL path


def _hand_made(h=8, w=6) -> Image.Image:
    """Every pixel different, so any misplaced crop/flip changes the result."""
    x = torch.arange(h * w * 3, dtype=torch.int64).reshape(3, h, w) * 7 % 251 + 1
    return F.to_pil_image(x.to(torch.uint8))


def _pil_augment(img: Image.Image, pad: int, i: int, j: int, flip: bool) -> torch.Tensor:
    out = F.crop(F.pad(img, pad, fill=0), i, j, img.height, img.width)
    return F.pil_to_tensor(F.hflip(out) if flip else out)


@pytest.mark.parametrize("i,j,flip", [(0, 0, False), (4, 4, False), (0, 4, True), (3, 1, True), (2, 2, False)])
def test_device_augment_matches_pil_crop_and_flip(i, j, flip):
    img, pad = _hand_made(), 2
    aug = DeviceAugment(MEAN, STD, pad=pad)
    x = F.pil_to_tensor(img)[None]
    got = aug.augment(x, torch.tensor([i]), torch.tensor([j]), torch.tensor([flip]))
    assert got.dtype == torch.uint8 and torch.equal(got[0], _pil_augment(img, pad, i, j, flip))


def test_device_augment_batch_is_vectorised_per_sample():
    img, pad = _hand_made(), 2
    x = F.pil_to_tensor(img)[None].repeat(4, 1, 1, 1)
    rows, cols, flips = torch.tensor([0, 1, 4, 2]), torch.tensor([4, 0, 3, 2]), torch.tensor([True, False, True, False])
    got = DeviceAugment(MEAN, STD, pad=pad).augment(x, rows, cols, flips)
    for k in range(4):
        assert torch.equal(got[k], _pil_augment(img, pad, int(rows[k]), int(cols[k]), bool(flips[k])))


def test_train_transform_output_is_one_of_the_device_augment_outputs():
    """The torchvision v2 PIL pipeline (resize -> pad -> crop -> flip -> normalise) and DeviceAugment on
    the resized uint8 image produce the same set of images."""
    img, pad = _hand_made(), 2
    aug = DeviceAugment(MEAN, STD, pad=pad)
    x = F.pil_to_tensor(img)[None]
    candidates = [aug.normalize(aug.augment(x, torch.tensor([i]), torch.tensor([j]), torch.tensor([f])))[0]
                  for i in range(2 * pad + 1) for j in range(2 * pad + 1) for f in (False, True)]
    t = build_train_transform((8, 6), MEAN, STD, pad=pad)
    torch.manual_seed(0)
    for _ in range(10):
        out = t(img)
        assert out.shape == (3, 8, 6) and out.dtype == torch.float32
        assert min(float((out - c).abs().max()) for c in candidates) < 1e-5


def test_device_augment_normalise_equals_test_transform_and_random_draws():
    img = Image.effect_noise((40, 80), 50).convert("RGB")
    cache_like = F.pil_to_tensor(build_test_transform(SIZE, MEAN, STD).transforms[0](img))[None]  # PIL resize
    aug = DeviceAugment(MEAN, STD, pad=3, seed=5).eval()
    ref = build_test_transform(SIZE, MEAN, STD)(img)
    assert torch.allclose(aug(cache_like)[0], ref, atol=1e-5)

    batch = cache_like.repeat(400, 1, 1, 1)
    aug.train()
    out = aug(batch)
    lo = (0 - torch.tensor(MEAN)) / torch.tensor(STD)
    hi = (1 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert out.shape == batch.shape and out.dtype == torch.float32
    assert (out >= lo.view(1, 3, 1, 1) - 1e-5).all() and (out <= hi.view(1, 3, 1, 1) + 1e-5).all()
    rows, cols, flips = DeviceAugment(MEAN, STD, pad=3, seed=5).sample(400, torch.device("cpu"))
    assert set(rows.tolist()) == set(range(7)) and set(cols.tolist()) == set(range(7))
    assert 150 < int(flips.sum()) < 250
    # same seed, same draws; set_epoch makes an epoch's draws independent of the past
    a, b = DeviceAugment(MEAN, STD, pad=3, seed=5), DeviceAugment(MEAN, STD, pad=3, seed=5)
    assert torch.equal(a(batch[:8]), b(batch[:8]))
    a(batch[:8])
    a.set_epoch(3)
    b.set_epoch(3)
    assert torch.equal(a(batch[:8]), b(batch[:8]))
    assert torch.equal(DeviceAugment(MEAN, STD, pad=0, flip=False)(batch[:2]), aug.normalize(batch[:2]))


# ------------------------------------------------------------------------------------------------
# cache and loaders


def test_image_cache_marks_bad_images_and_train_pairs_drop_them(tmp_path, tokenizer):
    recs = _records(tmp_path, 4, broken={3})
    cache = ImageCache([r.image_path for r in recs], SIZE, progress=False)
    assert cache.images.shape == (4, 3, *SIZE) and cache.images.dtype == torch.uint8
    assert cache.ok.tolist() == [True, True, True, False] and cache.failures == 1
    ref = F.pil_to_tensor(build_test_transform(SIZE, MEAN, STD).transforms[0](Image.open(recs[0].image_path)))
    assert torch.equal(cache.images[0], ref)
    ds = TrainPairs(recs, tokenizer, 16, cache=cache)
    assert len(ds) == 6 and ds[5]["image"].dtype == torch.uint8
    assert [r.index for r in ds.left_out] == [3]  # named, for the run's data report


def test_build_loaders(synth_root, tokenizer):
    cfg = load_config("lgur_tiny", ["data.num_workers=0", "optim.batch_size=6"])
    ann = load_annotations(synth_root)
    loaders = build_loaders(cfg, ann, tokenizer, MEAN, STD, progress=False)
    assert loaders.val is not None and loaders.augment is None and loaders.sampler.num_replicas == 1
    assert len(loaders.train) == 152 // 6  # 19 train ids x 4 images x 2 captions, drop_last
    b = next(iter(loaders.train))
    assert set(b) == {"images", "input_ids", "attention_mask", "lengths", "labels", "indices"}
    assert torch.equal(b["lengths"], b["attention_mask"].sum(1))  # on the CPU, for the text encoder's packing
    assert b["images"].shape == (6, 3, *cfg.data.image_size) and b["images"].dtype == torch.float32
    assert b["attention_mask"].sum(1).max() == b["input_ids"].shape[1]  # padded to the longest caption only
    assert b["labels"].max() < ann.num_train_ids
    assert torch.equal(loaders.prepare(b["images"], train=True), b["images"])
    again = next(iter(build_loaders(cfg, ann, tokenizer, MEAN, STD, progress=False).train))
    assert torch.equal(again["indices"], b["indices"])  # seeded order
    test = loaders.test
    assert len(test.images) == 12 and len(test.captions) == 24  # 3 test ids x 4 images x 2 captions
    assert test.caption_image_index.tolist() == [i // 2 for i in range(24)]
    assert test.image_pids.tolist() == [22] * 4 + [23] * 4 + [24] * 4
    eb = next(iter(test.image_loader))
    assert set(eb) == {"images", "labels", "indices"}
    assert loaders.report() == ""

    cfg.data.cache_images = True
    cached = build_loaders(cfg, ann, tokenizer, MEAN, STD, progress=False)
    cb = next(iter(cached.train))
    assert cb["images"].dtype == torch.uint8
    x = cached.prepare(cb["images"], train=True)
    assert x.dtype == torch.float32 and x.shape == cb["images"].shape
    eval_cached = cached.prepare(next(iter(cached.test.image_loader))["images"], train=False)
    assert torch.allclose(eval_cached, eb["images"], atol=1e-5)  # cache path == PIL path at test time


def test_build_loaders_distributed_and_no_val(tmp_path, tokenizer):
    """DistributedSampler under a 1-process gloo group; a dataset without val (ICFG-like) has val None."""
    recs = [{"split": s, "captions": ["a person walking", "someone in red"], "file_path": f"{s}/{pid}_{k}.jpg", "id": pid}
            for pid, s in [(1, "train"), (2, "train"), (3, "test")] for k in range(2)]
    for r in recs:
        (tmp_path / "imgs" / r["split"]).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20, 40), (r["id"] * 60, 0, 0)).save(tmp_path / "imgs" / r["file_path"])
    (tmp_path / "ICFG-PEDES.json").write_text(json.dumps(recs))
    ann = load_annotations(tmp_path)
    cfg = load_config("lgur_tiny", ["data.num_workers=0", "optim.batch_size=4"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        loaders = build_loaders(cfg, ann, tokenizer, MEAN, STD, distributed=True, progress=False)
        assert isinstance(loaders.sampler, torch.utils.data.DistributedSampler)
        loaders.set_epoch(0)
        first = next(iter(loaders.train))["indices"]
        loaders.set_epoch(1)
        second = next(iter(loaders.train))["indices"]
        assert len(first) == 4 and not torch.equal(first, second)
        assert loaders.val is None and len(loaders.test.images) == 2
    finally:
        torch.distributed.destroy_process_group()


def test_loaders_name_every_substituted_record_across_workers(synth_root, tmp_path, tokenizer):
    """Decode failures inside DataLoader worker processes reach the main process's report, each named by
    its annotation record, with how often it happened; so do gallery blanks and truncated captions."""
    import shutil

    root = tmp_path / "d"
    shutil.copytree(synth_root, root)
    records = json.loads((root / "reid_raw.json").read_text())
    train = next(i for i, r in enumerate(records) if r["split"] == "train")
    test = next(i for i, r in enumerate(records) if r["split"] == "test")
    for i in (train, test):
        (root / "imgs" / records[i]["file_path"]).write_bytes(b"\xff\xd8 not a jpeg")
    records[test]["captions"][0] = "word " * 60  # over max_caption_tokens=48
    (root / "reid_raw.json").write_text(json.dumps(records))
    ann = load_annotations(root)
    cfg = load_config("lgur_tiny", ["data.num_workers=2", "data.persistent_workers=true", "optim.batch_size=4"])
    loaders = build_loaders(cfg, ann, tokenizer, MEAN, STD, progress=False)
    assert loaders.train.num_workers == 2
    for _ in range(2):  # two epochs through persistent workers
        assert sum(len(b["labels"]) for b in loaders.train) == len(loaders.train_set) // 4 * 4
    list(loaders.test.image_loader)
    found = {(p.kind, p.action, p.index): p.message for p in loaders.problems("reid_raw.json")}
    assert set(found) == {("decode_failure", "substituted", train), ("decode_failure", "substituted", test),
                          ("truncated_caption", "fixed", test)}
    assert records[train]["file_path"] in found[("decode_failure", "substituted", train)]
    # its 2 captions in each of 2 epochs (152 pairs make 38 full batches: none dropped), from 2 workers
    assert "4 time(s)" in found[("decode_failure", "substituted", train)]
    assert "blank image" in found[("decode_failure", "substituted", test)]
    report = ann.report(loaders.problems("reid_raw.json"))
    assert report["records_substituted"] == 2 and "while loading: 2 decode_failure substituted" in report["summary"]
