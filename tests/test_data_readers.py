"""Annotation readers (three layouts, name variants), every kind of bad input, and `lgur data-check`."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from lgur.cli import main
from lgur.data.annotations import CUHK_SPLIT_IDS, _Raw, _split_by_identity, Problems, load_annotations
from lgur.data.images import verify_image
from lgur.errors import DataError


def write_image(path: Path, color=(200, 40, 40), size=(16, 32)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def cuhk_records() -> list[dict]:
    """4 train ids (first appearance 3, 1, 4, 2), 1 val id, 1 test id; 2 images each, 2 captions each."""
    recs = []
    for pid, split in [(3, "train"), (1, "train"), (4, "train"), (2, "train"), (5, "val"), (6, "test")]:
        for k in range(2):
            recs.append({"split": split, "captions": [f"a person {pid} in red {k}", f"the man {pid} walks {k}"],
                         "file_path": f"CUHK01/{pid:04d}_{k}.png", "processed_tokens": [["a"], ["the"]], "id": pid})
    return recs


def make_dataset(root: Path, name: str, records: list[dict], image_field: str = "file_path") -> Path:
    """Write the annotation file and one image per record (unless the test removes it later)."""
    root.mkdir(parents=True, exist_ok=True)
    for r in records:
        if isinstance(r, dict) and isinstance(r.get(image_field), str) and ".." not in r[image_field]:
            write_image(root / "imgs" / r[image_field])
    (root / name).write_text(json.dumps(records))
    return root


def test_cuhk_reid_raw(tmp_path):
    root = make_dataset(tmp_path / "CUHK-PEDES", "reid_raw.json", cuhk_records())
    ann = load_annotations(root)
    assert ann.layout == "cuhk-pedes" and ann.annotation_file.name == "reid_raw.json"
    assert [len(ann.train), len(ann.val), len(ann.test)] == [8, 2, 2]
    # train ids remapped 0..N-1 in order of first appearance; val/test keep their raw ids
    assert [r.person_id for r in ann.train] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [r.raw_id for r in ann.train] == [3, 3, 1, 1, 4, 4, 2, 2]
    assert ann.num_train_ids == 4
    assert {r.person_id for r in ann.val} == {5} and {r.person_id for r in ann.test} == {6}
    r = ann.test[1]
    assert r.image_path == root / "imgs" / "CUHK01" / "0006_1.png" and r.index == 11 and r.split == "test"
    assert r.captions == ["a person 6 in red 1", "the man 6 walks 1"]
    assert len(ann.problems) == 0
    assert ann.counts()["train"] == {"images": 8, "captions": 16, "ids": 4}
    # the annotation file itself is accepted as the root
    assert len(load_annotations(root / "reid_raw.json").train) == 8


def test_cuhk_skip_train_ids(tmp_path):
    root = make_dataset(tmp_path, "reid_raw.json", cuhk_records())
    ann = load_annotations(root, skip_train_ids=[1, 99])
    assert ann.num_train_ids == 3 and ann.dropped_train_ids == 2
    assert [r.raw_id for r in ann.train] == [3, 3, 4, 4, 2, 2] and [r.person_id for r in ann.train] == [0, 0, 1, 1, 2, 2]


def test_cuhk_caption_all_split_by_identity(tmp_path):
    recs = [{"captions": [f"person {pid}"], "file_path": f"x/{pid}.jpg", "id": pid} for pid in range(13, 0, -1)]
    ann = load_annotations(make_dataset(tmp_path, "caption_all.json", recs))
    assert "11,003" in ann.split_rule
    assert {r.raw_id for r in ann.test} == {13} and {r.raw_id for r in ann.val} == {12}
    assert sorted(r.raw_id for r in ann.train) == list(range(1, 12))
    assert [p.kind for p in ann.problems.items] == ["split_rule"]  # 13 ids, not the standard 13,003


def test_standard_cuhk_split_numbers():
    """With the real 13,003 ids the rule gives exactly the published 11,003 / 1,000 / 1,000."""
    raws = [_Raw(i, pid, f"{pid}.jpg", ["c"], None) for i, pid in enumerate(range(13003, 0, -1))]
    problems = Problems()
    _split_by_identity(raws, "caption_all.json", problems)
    by = {s: sorted(r.raw_id for r in raws if r.split == s) for s in CUHK_SPLIT_IDS}
    assert {s: len(v) for s, v in by.items()} == CUHK_SPLIT_IDS
    assert by["train"][-1] == 11003 and by["val"] == list(range(11004, 12004)) and by["test"][0] == 12004
    assert len(problems) == 0


@pytest.mark.parametrize("name", ["ICFG-PEDES.json", "ICFG_PEDES.json"])
def test_icfg_split_field_not_folders(tmp_path, name):
    recs = [
        {"split": "train", "captions": ["a"], "file_path": "test/0001/0001_c1_0001.jpg", "id": 1},
        {"split": "train", "captions": ["b"], "file_path": "train/0002/0002_c1_0001.jpg", "id": 2},
        {"split": "test", "captions": ["c"], "file_path": "train/0003/0003_c1_0001.jpg", "id": 3},
    ]
    ann = load_annotations(make_dataset(tmp_path, name, recs))
    assert ann.layout == "icfg-pedes" and ann.annotation_file.name == name
    assert [r.image_path.parts[-3] for r in ann.train] == ["test", "train"]  # folder names are not the split
    assert [r.raw_id for r in ann.test] == [3] and ann.val == []


def test_rstpreid_img_path(tmp_path):
    recs = [{"id": pid, "img_path": f"{pid:04d}_c{k}_0031.jpg", "captions": ["one", "two"], "split": split}
            for pid, split in [(0, "train"), (1, "train"), (2, "val"), (3, "test")] for k in range(2)]
    ann = load_annotations(make_dataset(tmp_path, "data_captions.json", recs, "img_path"))
    assert ann.layout == "rstpreid"
    assert ann.train[0].image_path == tmp_path / "imgs" / "0000_c0_0031.jpg"
    assert [r.person_id for r in ann.train] == [0, 0, 1, 1] and len(ann.val) == 2 and len(ann.test) == 2


# ------------------------------------------------------------------------------------------------
# bad input


def test_wrong_root_and_missing_pieces(tmp_path):
    with pytest.raises(DataError, match="dataset root not found"):
        load_annotations(tmp_path / "nope")
    (tmp_path / "other.json").write_text("[]")
    with pytest.raises(DataError, match=r"no annotation file.*reid_raw.json.*other.json"):
        load_annotations(tmp_path)
    with pytest.raises(DataError, match="unknown annotation file name"):
        load_annotations(tmp_path / "other.json")
    (tmp_path / "reid_raw.json").write_text("[]")
    with pytest.raises(DataError, match="image folder not found"):
        load_annotations(tmp_path)


def test_json_not_a_list_or_invalid(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "reid_raw.json").write_text(json.dumps({"annotations": cuhk_records()}))
    with pytest.raises(DataError, match=r"reid_raw.json: expected a JSON list.*annotations"):
        load_annotations(tmp_path)
    (tmp_path / "reid_raw.json").write_text('[{"id": 1,')
    with pytest.raises(DataError, match="reid_raw.json: not valid JSON"):
        load_annotations(tmp_path)


def _problems(ann, kind):
    return [p for p in ann.problems.items if p.kind == kind]


def test_missing_image_is_skipped_and_named(tmp_path):
    root = make_dataset(tmp_path, "reid_raw.json", cuhk_records())
    (root / "imgs" / "CUHK01" / "0001_0.png").unlink()
    ann = load_annotations(root, max_bad_fraction=0.1)
    [p] = _problems(ann, "missing_image")
    assert p.action == "skipped" and p.index == 2 and "imgs/CUHK01/0001_0.png" in p.message
    assert str(p).startswith("reid_raw.json record #2:")
    assert len(ann.train) == 7 and ann.num_train_ids == 4


def test_corrupt_images_found_by_verify(tmp_path):
    recs = cuhk_records()
    recs[1]["file_path"] = "CUHK01/trunc.jpg"
    recs[2]["file_path"] = "CUHK01/garbage.jpg"
    root = make_dataset(tmp_path, "reid_raw.json", recs)
    png = root / "imgs" / "CUHK01" / "0003_0.png"
    png.write_bytes(png.read_bytes()[:-20])  # lost its end
    jpg = root / "imgs" / "CUHK01" / "trunc.jpg"
    Image.effect_noise((64, 128), 60).convert("RGB").save(jpg, quality=90)
    jpg.write_bytes(jpg.read_bytes()[: jpg.stat().st_size // 2])  # an interrupted download
    (root / "imgs" / "CUHK01" / "garbage.jpg").write_bytes(b"not an image at all")
    assert len(load_annotations(root, max_bad_fraction=None).problems) == 0  # existence only: not seen
    ann = load_annotations(root, max_bad_fraction=None, verify_images=True)
    bad = {p.index: p.message for p in _problems(ann, "corrupt_image")}
    assert set(bad) == {0, 1, 2}
    assert "0003_0.png" in bad[0] and "truncated JPEG" in bad[1] and "garbage.jpg" in bad[2]
    assert len(ann.train) == 5
    assert verify_image(root / "imgs" / "CUHK01" / "0004_0.png") is None


def test_empty_captions(tmp_path):
    recs = cuhk_records()
    recs[0]["captions"] = ["  ", "a real caption"]
    recs[1]["captions"] = ["", None]
    ann = load_annotations(make_dataset(tmp_path, "reid_raw.json", recs), max_bad_fraction=None)
    fixed, skipped = _problems(ann, "empty_caption")
    assert (fixed.action, fixed.index) == ("fixed", 0) and "1 of 2 captions" in fixed.message
    assert (skipped.action, skipped.index) == ("skipped", 1) and "no caption left" in skipped.message
    assert ann.train[0].captions == ["a real caption"] and len(ann.train) == 7


def test_missing_field_bad_field_bad_record(tmp_path):
    recs = cuhk_records()
    del recs[3]["id"]
    recs[4]["id"] = "4"
    recs[5]["captions"] = "one string"
    recs[6] = ["not", "a", "dict"]
    recs[7]["file_path"] = "../outside.png"
    ann = load_annotations(make_dataset(tmp_path, "reid_raw.json", recs), max_bad_fraction=None)
    assert ann.problems.counts() == {"missing_field": 1, "bad_field": 3, "bad_record": 1, "id_gap": 2}
    assert "missing field(s) id" in _problems(ann, "missing_field")[0].message
    assert sorted(p.index for p in ann.problems.items if p.action == "skipped") == [3, 4, 5, 6, 7]
    assert ann.problems.skipped_records() == 5 and len(ann.train) == 3


def test_unknown_split(tmp_path):
    recs = cuhk_records()
    recs[8]["split"] = "Validation"  # accepted spelling of val
    recs[9]["split"] = "trian"
    ann = load_annotations(make_dataset(tmp_path, "reid_raw.json", recs), max_bad_fraction=None)
    [p] = _problems(ann, "unknown_split")
    assert p.index == 9 and "'trian'" in p.message and len(ann.val) == 1


def test_id_gap_is_noted_and_labels_stay_contiguous(tmp_path):
    recs = [r for r in cuhk_records() if r["id"] != 2]  # raw ids 1, 3, 4, ...: a gap at 2
    ann = load_annotations(make_dataset(tmp_path, "reid_raw.json", recs))
    [p] = _problems(ann, "id_gap")
    assert p.action == "note" and "from 1 to 3" in p.message
    assert sorted({r.person_id for r in ann.train}) == [0, 1, 2]


def test_split_overlap_is_noted(tmp_path):
    recs = cuhk_records()
    recs[-1]["id"] = 3  # a test image of a train identity
    ann = load_annotations(make_dataset(tmp_path, "reid_raw.json", recs))
    assert "1 ids appear in more than one split" in _problems(ann, "split_overlap")[0].message


def test_too_many_bad_records_is_fatal(tmp_path):
    root = make_dataset(tmp_path, "reid_raw.json", cuhk_records())
    for k in range(2):
        (root / "imgs" / "CUHK01" / f"0001_{k}.png").unlink()
    with pytest.raises(DataError, match=r"2 of 12 records are unusable .*max_bad_fraction=10.0%"):
        load_annotations(root, max_bad_fraction=0.1)
    assert load_annotations(root, max_bad_fraction=0.2).num_train_ids == 3


def test_no_test_split_is_fatal(tmp_path):
    recs = [r for r in cuhk_records() if r["split"] != "test"]
    with pytest.raises(DataError, match="no usable 'test' records"):
        load_annotations(make_dataset(tmp_path, "reid_raw.json", recs))


# ------------------------------------------------------------------------------------------------
# lgur data-check


def test_data_check_cli(tmp_path, capsys):
    recs = cuhk_records()
    recs[0]["captions"][0] = "word " * 120  # over data.max_caption_tokens=100
    root = make_dataset(tmp_path, "reid_raw.json", recs)
    assert main(["data-check", str(root)]) == 0
    out = capsys.readouterr().out
    assert "cuhk-pedes" in out and "no problems found" in out
    assert "train          8        16      4" in out
    assert "captions over 100 tokens (truncated when loaded): train 1, val 0, test 0" in out

    (root / "imgs" / "CUHK01" / "0006_0.png").write_bytes(b"broken")
    assert main(["data-check", str(root), "--max-bad-fraction", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "corrupt_image: 1 records skipped" in out and "reid_raw.json record #10" in out

    assert main(["data-check", str(root)]) == 2  # 1/12 bad > 1% default limit
    captured = capsys.readouterr()
    assert "corrupt_image" in captured.out and "are unusable" in captured.err
    assert main(["data-check", str(tmp_path / "missing")]) == 2
    assert "dataset root not found" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# duplicate images, leakage between splits, the in/used report


def test_duplicate_image_and_leakage_between_splits_are_found(tmp_path):
    recs = cuhk_records()
    recs[1]["file_path"] = "CUHK01/0003_0.png"                # train record #1 = train record #0's image
    recs[11]["file_path"] = "CUHK01/./0001_1.png"             # test record #11 = train record #3's image
    root = make_dataset(tmp_path / "d", "reid_raw.json", recs)
    (root / "imgs" / "CUHK01" / "link.png").symlink_to(root / "imgs" / "CUHK01" / "0005_0.png")
    recs[9]["file_path"] = "CUHK01/link.png"                  # val record #9 = val record #8's image, by symlink
    (root / "reid_raw.json").write_text(json.dumps(recs))
    ann = load_annotations(root)
    assert ann.counts()["train"]["images"] == 7  # 8 records, 7 distinct images
    found = {(p.kind, p.index): p.message for p in ann.duplicates()}
    assert set(found) == {("duplicate_image", 1), ("image_in_two_splits", 11), ("duplicate_image", 9)}
    assert "record #0" in found[("duplicate_image", 1)] and "imgs/CUHK01/0003_0.png" in found[("duplicate_image", 1)]
    assert "record #3 (train)" in found[("image_in_two_splits", 11)] and "leakage" in found[("image_in_two_splits", 11)]
    assert "record #8" in found[("duplicate_image", 9)]
    ann.raise_if_duplicates(allow=True)
    with pytest.raises(DataError, match="allow_duplicate_images=true") as e:
        ann.raise_if_duplicates(allow=False)
    assert "2 duplicate_image, 1 image_in_two_splits" in str(e.value)
    assert not load_annotations(make_dataset(tmp_path / "clean", "reid_raw.json", cuhk_records())).duplicates()


def test_report_counts_what_went_in_and_what_is_used(tmp_path):
    recs = cuhk_records()
    recs[2]["captions"] = ["", "a caption"]                    # fixed: one caption dropped
    recs[5]["id"] = "x"                                        # skipped: bad field
    root = make_dataset(tmp_path, "reid_raw.json", recs)
    (root / "imgs" / recs[7]["file_path"]).unlink()            # skipped: missing image
    ann = load_annotations(root, skip_train_ids=[3], max_bad_fraction=None)  # excluded: records #0, #1
    r = ann.report()
    assert r["in"] == {"records": 12, "images": 12, "captions": 24}
    assert r["used"]["records"] == 12 - 2 - 2 and r["used"]["images"] == 8
    assert r["used"]["captions"] == 24 - 4 - 4 - 1
    assert r["used"]["splits"]["train"] == {"records": 4, "images": 4, "captions": 7}
    assert r["records_skipped"] == 2 and r["records_excluded"] == 2
    named = {(p["kind"], p["action"], p["record"]) for p in r["problems"]}
    assert {("bad_field", "skipped", 5), ("missing_image", "skipped", 7), ("empty_caption", "fixed", 2),
            ("skip_train_ids", "excluded", 0), ("skip_train_ids", "excluded", 1)} <= named
    assert all(p["file"] == "reid_raw.json" for p in r["problems"])
    left = ann.report(left_out=[ann.train[0]], splits=("train",))  # a loader could not use one record
    assert left["used"] == {"records": 3, "images": 3, "captions": 6,  # train[0] is record #2 (1 caption)
                            "splits": {"train": {"records": 3, "images": 3, "captions": 6}}}
    line = ann.summary()
    assert "12 records, 12 images, 24 captions in; used 8 records, 8 images, 15 captions" in line
    assert "2 records skipped, 0 substituted, 2 excluded on request" in line


def test_data_check_reports_duplicates_and_exits_2(tmp_path, capsys):
    recs = cuhk_records()
    recs[11]["file_path"] = recs[0]["file_path"]  # the test split shares a train image
    root = make_dataset(tmp_path, "reid_raw.json", recs)
    assert main(["data-check", str(root), "--no-verify"]) == 2
    captured = capsys.readouterr()
    assert "image_in_two_splits: 1 noted" in captured.out and "reid_raw.json record #11" in captured.out
    assert "lgur train` refuses them unless data.allow_duplicate_images=true" in captured.out
    assert "allow_duplicate_images" in captured.err
    recipe = tmp_path / "allow.yaml"
    recipe.write_text("data:\n  allow_duplicate_images: true\n")
    assert main(["data-check", str(root), "--no-verify", "--config", str(recipe)]) == 0
    assert "in and used   reid_raw.json: 12 records, 11 images, 24 captions in" in capsys.readouterr().out
