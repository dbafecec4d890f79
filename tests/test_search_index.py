"""`lgur index` / `lgur search` / Searcher on a tiny synthetic gallery and the tiny random-init model."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lgur.cli import main
from lgur.search.index import GalleryIndex, SearchError, build_index
from lgur.search.searcher import Searcher


def synth_images(synth_root: Path) -> list[Path]:
    return sorted((synth_root / "imgs").rglob("*.jpg"))


def encode_reference(checkpoint: Path, files: list[Path]) -> torch.Tensor:
    """Embeddings computed directly with the model (no index code)."""
    from lgur.checkpoint import load_model
    from lgur.data.images import load_rgb
    from lgur.data.transforms import build_test_transform

    model, cfg, _ = load_model(checkpoint)
    tf = build_test_transform(cfg.data.image_size, model.image_mean, model.image_std, cfg.data.interpolation)
    with torch.no_grad():
        return model.encode_images(torch.stack([tf(load_rgb(f)) for f in files]))


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_index_incremental_update_and_unreadable_files(tmp_path, tiny_checkpoint, synth_root, capsys, monkeypatch):
    import lgur.search.index as index_mod

    images = synth_images(synth_root)
    gallery = tmp_path / "gallery"
    for i, src in enumerate(images[:12]):
        dst = gallery / ("a" if i % 2 else "b/c") / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)
    (gallery / "corrupt.jpg").write_bytes(b"\xff\xd8 not really a jpeg" * 10)
    data = images[12].read_bytes()
    (gallery / "a" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (gallery / "notes.txt").write_text("not an image, not counted")
    out = tmp_path / "g.lgidx"

    code, stdout, _ = run_cli(capsys, "index", "--checkpoint", tiny_checkpoint, "--images", gallery, "--out", out,
                              "--workers", "0", "--quiet")
    assert code == 0
    assert "kept 0, added 12 (0 changed), removed 0, skipped 2 unreadable" in stdout
    assert "corrupt.jpg" in stdout and "a/truncated.jpg" in stdout
    first = GalleryIndex.load(out)
    assert len(first) == 12 and first.embeddings.dtype == torch.float16 and first.embeddings.shape[1] == 192
    assert sorted(s["path"] for s in first.manifest["skipped"]) == ["a/truncated.jpg", "corrupt.jpg"]
    assert [f["path"] for f in first.files] == sorted(f["path"] for f in first.files)
    ref = encode_reference(tiny_checkpoint, [first.file(i) for i in range(12)])
    torch.testing.assert_close(first.embeddings.float(), ref, atol=2e-3, rtol=0)  # fp16 storage

    # grow: 3 new, 2 deleted, 1 changed in place; count what gets encoded
    for src in images[20:23]:
        shutil.copy(src, gallery / "a" / f"new_{src.name}")
    removed = [first.file(0), first.file(5)]
    for f in removed:
        f.unlink()
    changed = first.file(3)
    Image.open(images[40]).save(changed)  # other pixels, other size/mtime
    encoded: list[int] = []
    real_encode = index_mod.encode_files

    def spy(model, dataset, positions, *args, **kwargs):
        encoded.extend(positions)
        return real_encode(model, dataset, positions, *args, **kwargs)

    monkeypatch.setattr(index_mod, "encode_files", spy)
    code, stdout, _ = run_cli(capsys, "index", "--checkpoint", tiny_checkpoint, "--images", gallery, "--out", out,
                              "--workers", "0", "--quiet")
    assert "kept 9, added 4 (1 changed), removed 2, skipped 2 unreadable" in stdout
    assert len(encoded) == 4 + 2  # new + changed, and the two unreadable files are retried
    second = GalleryIndex.load(out)
    assert len(second) == 13
    kept = {f["path"]: first.embeddings[i] for i, f in enumerate(first.files)}
    for i, f in enumerate(second.files):
        if f["path"] in kept and second.file(i) != changed:
            assert torch.equal(second.embeddings[i], kept[f["path"]])  # reused rows are the old bytes
    # the update equals a build from scratch
    monkeypatch.setattr(index_mod, "encode_files", real_encode)
    fresh, report = build_index(tiny_checkpoint, gallery, tmp_path / "fresh.lgidx", num_workers=0, progress=False)
    assert [f["path"] for f in fresh.files] == [f["path"] for f in second.files]
    torch.testing.assert_close(fresh.embeddings.float(), second.embeddings.float(), atol=1e-3, rtol=0)
    assert report.added == 13 and len(report.skipped) == 2


def test_index_errors_are_readable(tmp_path, tiny_checkpoint, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "index", "--checkpoint", tiny_checkpoint, "--images", tmp_path / "empty",
                           "--out", tmp_path / "x.lgidx", "--quiet")
    assert code == 2 and "no images" in err
    code, _, err = run_cli(capsys, "index", "--checkpoint", tmp_path / "missing.safetensors", "--images",
                           tmp_path / "empty", "--out", tmp_path / "x.lgidx")
    assert code == 2 and "checkpoint not found" in err
    code, _, err = run_cli(capsys, "search", "--index", tmp_path / "nothing.lgidx", "a man")
    assert code == 2 and "not an lgur index" in err


def test_other_model_is_refused(tmp_path, built_index, tiny_checkpoint, synth_root, capsys, make_checkpoint):
    other = make_checkpoint(tmp_path / "other.safetensors", seed=1)
    with pytest.raises(SearchError, match="is not the model that built"):
        Searcher(built_index, checkpoint=other)
    code, _, err = run_cli(capsys, "search", "--index", built_index, "--checkpoint", other, "a man")
    assert code == 2 and "not the model that built" in err and err.count("\n") == 1
    # re-indexing with another model re-encodes everything and says why
    copy = tmp_path / "copy.lgidx"
    shutil.copytree(built_index, copy)
    index, report = build_index(other, synth_root / "imgs", copy, num_workers=0, progress=False)
    assert "checkpoint differs" in report.summary() and report.kept == 0 and report.added == len(index)
    assert Searcher(copy).search("a man", k=1)[0].hits


def parse_search_output(stdout: str) -> list[tuple[str, list[tuple[int, float, str]]]]:
    blocks = []
    for line in stdout.splitlines():
        if line.startswith("query: "):
            blocks.append((line[len("query: "):], []))
        elif m := re.fullmatch(r"\s*(\d+)\s+(-?[\d.]+)\s+(\S+)", line):
            blocks[-1][1].append((int(m[1]), float(m[2]), m[3]))
    return blocks


def test_search_cli_matches_brute_force_and_writes_sheets(tmp_path, built_index, tiny_checkpoint, capsys):
    query = "a man in a black jacket with a red backpack"
    html, png = tmp_path / "sheet.html", tmp_path / "sheet.png"
    code, stdout, _ = run_cli(capsys, "search", "--index", built_index, query, "-k", "5", "--html", html,
                              "--png", png)
    assert code == 0
    [(text, rows)] = parse_search_output(stdout)
    assert text == query and [r[0] for r in rows] == [1, 2, 3, 4, 5]
    # brute-force reference: full fp32 score vector + sort
    from lgur.checkpoint import load_model

    model = load_model(tiny_checkpoint)[0]
    index = GalleryIndex.load(built_index)
    scores = model.encode_captions([query])[0] @ index.embeddings.float().T
    order = scores.argsort(descending=True)[:5]
    assert [r[2] for r in rows] == [index.files[i]["path"] for i in order]
    assert [r[1] for r in rows] == pytest.approx(scores[order].tolist(), abs=1e-4)

    page = html.read_text()
    assert page.count("<figure class='hit'") == 5 and page.count("data:image/jpeg;base64,") == 5
    assert query in page
    sheet = Image.open(png)
    assert sheet.width >= 5 * 80 and sheet.height > 160


def test_queries_file_is_encoded_in_one_batch(tmp_path, built_index, capsys, monkeypatch):
    from lgur.models.lgur import LGUR

    qfile = tmp_path / "q.txt"
    qfile.write_text("a woman in a white dress\n\n  a man with a blue cap  \na child in green\n")
    calls = []
    real = LGUR.encode_captions
    monkeypatch.setattr(LGUR, "encode_captions", lambda self, caps: calls.append(len(caps)) or real(self, caps))
    code, stdout, _ = run_cli(capsys, "search", "--index", built_index, "--queries", qfile, "-k", "3")
    assert code == 0 and calls == [3]
    blocks = parse_search_output(stdout)
    assert [b[0] for b in blocks] == ["a woman in a white dress", "a man with a blue cap", "a child in green"]
    assert all(len(rows) == 3 for _, rows in blocks)
    code, _, err = run_cli(capsys, "search", "--index", built_index, "--queries", tmp_path / "none.txt")
    assert code == 2 and "file not found" in err


def test_relevant_marks_hits_green(tmp_path, built_index):
    from lgur.search.sheet import COLORS, write_html, write_png

    searcher = Searcher(built_index)
    [plain] = searcher.search(["a person"], k=4)
    truth = {plain.hits[0].path, plain.hits[2].path}
    [marked] = searcher.search(["a person"], k=4, relevant=[truth])
    assert [h.correct for h in marked.hits] == [True, False, True, False]
    [by_fn] = searcher.search(["a person"], k=4, relevant=lambda qi, text, path: path == plain.hits[1].path)
    assert [h.correct for h in by_fn.hits] == [False, True, False, False]
    page = write_html([marked], tmp_path / "m.html", embed=False).read_text()
    assert page.count("class='hit correct'") == 2 and page.count("class='hit wrong'") == 2
    assert "../" in page or "imgs/" in page  # linked by relative path, not embedded
    sheet = Image.open(write_png([marked], tmp_path / "m.png")).convert("RGB")
    # the first cell's border (left edge, mid-height of the crop row) is green, the second's red
    y = 10 + 18 + 80
    assert sheet.getpixel((10 + 1, y)) == COLORS[True]
    assert sheet.getpixel((10 + 96 + 1, y)) == COLORS[False]
    with pytest.raises(SearchError, match="ground-truth sets"):
        searcher.search(["a", "b"], k=2, relevant=[truth])


@pytest.mark.skipif(__import__("importlib").util.find_spec("faiss") is None, reason="faiss not installed")
def test_index_with_pca_and_ann(tmp_path, built_index, synth_root, tiny_checkpoint, capsys, monkeypatch):
    copy = tmp_path / "pca.lgidx"
    shutil.copytree(built_index, copy)
    code, stdout, _ = run_cli(capsys, "index", "--checkpoint", tiny_checkpoint, "--images", synth_root / "imgs",
                              "--out", copy, "--pca", "32", "--ann", "hnsw", "--workers", "0", "--quiet")
    assert code == 0 and "kept 96, added 0" in stdout
    assert re.search(r"PCA 192 -> 32 keeps [\d.]+ % of the rows' energy: recall@10 [\d.]+ with re-ranking", stdout)
    assert re.search(r"ANN hnsw over 32-d vectors.*efSearch=\d+: recall@10 [\d.]+", stdout)
    manifest = json.loads((copy / "manifest.json").read_text())
    assert manifest["pca"]["dim"] == 32 and manifest["ann"]["kind"] == "hnsw"
    stored_rows = GalleryIndex.load(copy).embeddings.float()
    components = torch.from_numpy(np.load(copy / manifest["data"] / "pca.npy"))
    kept = float((stored_rows @ components).pow(2).sum() / stored_rows.pow(2).sum())  # all 96 rows are the sample
    assert manifest["pca"]["energy"] == pytest.approx(kept, rel=1e-4) and 0 < kept <= 1
    assert (copy / manifest["data"] / "ann.faiss").is_file()
    # the recall the build reports is the one a search gets: recomputed here against a written-out brute
    # force over the stored full-dim rows, for the build's own queries (recall_queries, seed 0)
    from lgur.search.ann import recall_queries

    stored = GalleryIndex.load(copy).embeddings
    queries = recall_queries(stored, manifest["ann"]["queries"])
    truth = (queries @ stored.float().T).topk(10, dim=1).indices
    found = Searcher(copy, mode="ann").engine.search(queries, 10)[1]
    recall = np.mean([len(set(f.tolist()) & set(t.tolist())) / 10 for f, t in zip(found, truth)])
    assert manifest["ann"]["recall@10"] == pytest.approx(recall, abs=0.01)  # fp16/bf16 near-ties may swap
    assert manifest["ann"]["recall@10"] >= 0.95  # tuned to reach search.ann_recall_target (0.95 by default)
    exact = Searcher(copy, mode="exact").search(["a man in a black jacket"], k=10)[0]
    ann = Searcher(copy, mode="ann").search(["a man in a black jacket"], k=10)[0]
    pca = Searcher(copy).search(["a man in a black jacket"], k=10)[0]  # below ann_threshold: PCA scan
    assert type(Searcher(copy).engine).__name__ == "TwoStageSearch"
    for hits in (ann.hits, pca.hits):
        assert len({h.id for h in hits} & {h.id for h in exact.hits}) >= 8  # re-ranked from full dims
    # without faiss (the GPU box) the index still loads and searches, without its ANN part
    import lgur.search.ann as ann_mod

    with monkeypatch.context() as m:
        m.setattr(ann_mod, "faiss_or_none", lambda: None)
        fallback = Searcher(copy)
        assert fallback.index.ann is None and type(fallback.engine.first).__name__ == "ExactSearch"
        assert [h.id for h in fallback.search(["a man in a black jacket"], k=10)[0].hits] == [h.id for h in pca.hits]
        with pytest.raises(SearchError, match="needs faiss"):
            Searcher(copy, mode="ann")
    # an update keeps the PCA/ANN settings; --pca 0 --ann none removes them
    code, stdout, _ = run_cli(capsys, "index", "--checkpoint", tiny_checkpoint, "--images", synth_root / "imgs",
                              "--out", copy, "--workers", "0", "--quiet")
    assert "PCA 192 -> 32" in stdout and "ANN hnsw" in stdout and "< search.ann_threshold" in stdout
    code, stdout, _ = run_cli(capsys, "index", "--checkpoint", tiny_checkpoint, "--images", synth_root / "imgs",
                              "--out", copy, "--pca", "0", "--ann", "none", "--workers", "0", "--quiet")
    manifest = json.loads((copy / "manifest.json").read_text())
    assert manifest["pca"] is None and manifest["ann"] is None and not (copy / manifest["data"] / "ann.faiss").exists()
    assert [p.name for p in copy.glob("data-*")] == [manifest["data"]]  # the superseded versions are gone
    with pytest.raises(SearchError, match="no ANN index"):
        Searcher(copy, mode="ann")


# ---------------------------------------------------------------------------------------------------
# on-disk format: atomic saves, stale leftovers, malformed manifests, metadata columns


def fake_index(n: int, d: int = 8, seed: int = 0) -> GalleryIndex:
    """An index without a model: random unit rows, paths c{i%3}/{i}.jpg."""
    from lgur.search.index import Rows
    from lgur.search.topk import Shards

    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).half()
    rows = Rows.from_dicts([{"path": f"c{i % 3}/{i:04d}.jpg", "size": i, "mtime_ns": seed, "camera": i % 3}
                            for i in range(n)])
    manifest = {"fingerprint": f"fp{seed}", "checkpoint": "ck", "images_root": "/nowhere", "dtype": "fp16", "dim": d,
                "skipped": [], "pca": None, "ann": None}
    return GalleryIndex(manifest, rows, Shards([emb]))


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so no `except Exception` handler sees it."""


def test_save_is_atomic_at_every_step(tmp_path, monkeypatch):
    """Kill the save at each file-system step in turn: the path always loads, as the old or the new index,
    and the next save leaves exactly one data version and no temp files (lgur-index-1 left nothing at the
    path when killed between its two renames, and leaked .tmp-/.old- folders)."""
    import os

    import numpy as np

    import lgur.search.index as index_mod

    old, new = fake_index(20, seed=1), fake_index(23, seed=2)
    # count the steps of one save
    steps = []
    real = {"replace": os.replace, "fsync": os.fsync, "save": np.save, "rmtree": index_mod.shutil.rmtree}

    def hook(name, kill_at):
        def f(*a, **k):
            steps.append(name)
            if len(steps) == kill_at:
                raise Killed(name)
            return real[name](*a, **k)
        return f

    def patch(kill_at):
        steps.clear()
        monkeypatch.setattr(os, "replace", hook("replace", kill_at))
        monkeypatch.setattr(os, "fsync", hook("fsync", kill_at))
        monkeypatch.setattr(np, "save", hook("save", kill_at))
        monkeypatch.setattr(index_mod.shutil, "rmtree", hook("rmtree", kill_at))

    def unpatch():
        monkeypatch.setattr(os, "replace", real["replace"])
        monkeypatch.setattr(os, "fsync", real["fsync"])
        monkeypatch.setattr(np, "save", real["save"])
        monkeypatch.setattr(index_mod.shutil, "rmtree", real["rmtree"])

    base = tmp_path / "base.lgidx"
    old.save(base)
    probe = tmp_path / "probe.lgidx"
    shutil.copytree(base, probe)
    patch(kill_at=10 ** 9)
    new.save(probe)
    unpatch()
    total = len(steps)
    assert total >= 8 and "replace" in steps
    # a kill skips every cleanup: no finally/__exit__ runs (the OS releases the lock)
    monkeypatch.setattr(index_mod.IndexWriter, "__exit__", lambda self, *exc: self._lock.close())
    outcomes = set()
    for kill_at in range(1, total + 1):
        path = tmp_path / f"k{kill_at}.lgidx"
        shutil.copytree(base, path)
        patch(kill_at)
        with pytest.raises(Killed):
            new.save(path)
        unpatch()
        loaded = GalleryIndex.load(path)
        which = {20: "old", 23: "new"}[len(loaded)]
        outcomes.add(which)
        ref = old if which == "old" else new
        assert torch.equal(loaded.embeddings, ref.embeddings) and loaded.files.paths() == ref.files.paths()
        # the next writer removes what the killed one left
        new.save(path)
        names = sorted(p.name for p in path.iterdir())
        assert names == [".lock", json.loads((path / "manifest.json").read_text())["data"], "manifest.json"], names
        assert not list(tmp_path.glob(f".{path.name}*"))
    assert outcomes == {"old", "new"}


def test_failed_save_removes_its_data_and_keeps_the_old(tmp_path, monkeypatch):
    import lgur.search.index as index_mod

    path = tmp_path / "g.lgidx"
    fake_index(10, seed=1).save(path)
    monkeypatch.setattr(index_mod.IndexWriter, "write_rows", lambda self, rows: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        fake_index(12, seed=2).save(path)
    assert len(GalleryIndex.load(path)) == 10 and len(list(path.glob("data-*"))) == 1
    # a folder that is not an index is never replaced
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"x")
    with pytest.raises(SearchError, match="not an lgur index"):
        fake_index(3).save(tmp_path / "photos")
    assert (tmp_path / "photos" / "a.jpg").read_bytes() == b"x"


def test_killed_update_is_reused_by_the_rerun(tmp_path, tiny_checkpoint, synth_root, monkeypatch):
    """A kill while committing an update leaves the old index; the re-run encodes only the new files."""
    import lgur.search.index as index_mod

    gallery = tmp_path / "gallery"
    gallery.mkdir()
    images = synth_images(synth_root)
    for src in images[:6]:
        shutil.copy(src, gallery / src.name)
    out = tmp_path / "g.lgidx"
    build_index(tiny_checkpoint, gallery, out, num_workers=0, progress=False)
    for src in images[6:8]:
        shutil.copy(src, gallery / src.name)
    with monkeypatch.context() as m:
        def killed(*a, **k):
            raise Killed()
        m.setattr(index_mod.os, "replace", killed)
        m.setattr(index_mod.IndexWriter, "__exit__", lambda self, *exc: self._lock.close())
        with pytest.raises(Killed):
            build_index(tiny_checkpoint, gallery, out, num_workers=0, progress=False)
    assert len(GalleryIndex.load(out)) == 6 and len(list(out.glob("data-*"))) == 2  # old + the killed one
    encoded = []
    real = index_mod.encode_files
    monkeypatch.setattr(index_mod, "encode_files", lambda model, ds, pos, *a, **k: encoded.extend(pos) or real(model, ds, pos, *a, **k))
    _, report = build_index(tiny_checkpoint, gallery, out, num_workers=0, progress=False)
    assert report.kept == 6 and report.added == 2 and len(encoded) == 2
    assert len(GalleryIndex.load(out)) == 8 and len(list(out.glob("data-*"))) == 1


@pytest.mark.parametrize("edit, message", [
    (lambda m: "\x00garbage{{", "unreadable manifest"),
    (lambda m: [1, 2], "not a JSON object"),
    (lambda m: {k: v for k, v in m.items() if k != "dim"}, "'dim' must be a count"),
    (lambda m: {**m, "dim": "8"}, "'dim' must be a count"),
    (lambda m: {**m, "count": -1}, "'count' must be a count"),
    (lambda m: {**m, "fingerprint": 7}, "'fingerprint' must be a string"),
    (lambda m: {**m, "data": "../../etc"}, "'data' must name"),
    (lambda m: {**m, "shards": [{"file": "../x.npy", "rows": 10}]}, "'shards' must be a list"),
    (lambda m: {**m, "shards": "all"}, "'shards' must be a list"),
    (lambda m: {**m, "columns": {"path": "str"}}, "lacks path/size/mtime_ns"),
    (lambda m: {**m, "columns": {**m["columns"], "x;rm": "int"}}, "'columns' must map"),
    (lambda m: {**m, "ann": {"kind": "evil"}}, "'ann' must be null"),
    (lambda m: {**m, "pca": {"dim": 99, "rerank": 1}}, "'pca' must be null"),
    (lambda m: {**m, "format": "lgur-index-1"}, "older lgur; rebuild it"),
    (lambda m: {**m, "dim": 16}, "embedding width 8, the manifest says 16"),
    (lambda m: {**m, "count": 11, "shards": [{"file": "emb-00000.npy", "rows": 11}]}, "shape"),
])
def test_malformed_manifest_is_a_readable_error(tmp_path, capsys, edit, message):
    path = tmp_path / "g.lgidx"
    fake_index(10).save(path)
    manifest = json.loads((path / "manifest.json").read_text())
    edited = edit(manifest)
    (path / "manifest.json").write_text(edited if isinstance(edited, str) else json.dumps(edited))
    with pytest.raises(SearchError, match=re.escape(message)):
        GalleryIndex.load(path)
    code, _, err = run_cli(capsys, "search", "--index", path, "a man")
    assert code == 2 and message in err and err.count("\n") == 1


def test_wrong_embedding_width_is_refused_before_serving(tmp_path, built_index, capsys):
    """Shards and manifest consistently of another width than the model: refused at start-up (it used to
    start the server, then every search was a 500)."""
    import numpy as np

    copy = tmp_path / "wide.lgidx"
    shutil.copytree(built_index, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    for s in manifest["shards"]:
        np.save(copy / manifest["data"] / s["file"], np.zeros((s["rows"], 7), np.float16))
    manifest["dim"] = 7
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SearchError, match="embeddings of width 7, but .* encodes 192-d"):
        Searcher(copy)
    code, _, err = run_cli(capsys, "serve", "--index", copy, "--port", "1")
    assert code == 2 and "width 7" in err


def test_metadata_from_pattern_sidecar_and_producer(tmp_path, tiny_checkpoint, synth_root, capsys):
    from lgur.search.index import PathPattern, parse_time, read_sidecar

    images = synth_images(synth_root)
    gallery = tmp_path / "gallery"
    names = []
    for i, src in enumerate(images[:6]):
        rel = f"cam{i % 2 + 1}/20261128T14{i:02d}00_{i}.jpg"
        (gallery / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, gallery / rel)
        names.append(rel)
    sidecar = tmp_path / "meta.csv"
    sidecar.write_text("path,video,score\n" + f"{names[0]},v0.mp4,0.5\n" + f"{names[3]},v3.mp4,2\n")
    out = tmp_path / "m.lgidx"
    code, stdout, _ = run_cli(capsys, "index", "--checkpoint", tiny_checkpoint, "--images", gallery, "--out", out,
                              "--meta-pattern", r"cam(?P<camera>\d+)/(?P<time>\d{8}T\d{6})", "--meta", sidecar,
                              "--workers", "0", "--quiet")
    assert code == 0 and "metadata columns: camera (int), score (float), time (float), video (str)" in stdout
    index = GalleryIndex.load(out)
    by_path = {index.files[i]["path"]: index.files[i] for i in range(len(index))}
    row = by_path[names[3]]
    assert row["camera"] == 2 and row["video"] == "v3.mp4" and row["score"] == 2.0
    assert row["time"] == parse_time("2026-11-28T14:03:00Z") == parse_time("20261128T140300")
    assert by_path[names[1]]["video"] == "" and by_path[names[1]]["score"] is None  # not in the sidecar
    # a producer's dict (e.g. video crops); an update keeps the stored values of rows it does not mention
    shutil.copy(images[7], gallery / "cam1" / "extra.jpg")
    producer = {"cam1/extra.jpg": {"video": "cam1.mp4", "frame": 120, "t": 4.0, "x1": 1, "y1": 2, "x2": 30, "y2": 80,
                                   "track": 7}}
    index, report = build_index(tiny_checkpoint, gallery, out, num_workers=0, progress=False, metadata=producer)
    assert report.added == 1 and report.kept == 6
    rows = {index.files[i]["path"]: index.files[i] for i in range(len(index))}
    assert rows["cam1/extra.jpg"]["frame"] == 120 and rows["cam1/extra.jpg"]["track"] == 7
    assert rows["cam1/extra.jpg"]["camera"] is None
    assert rows[names[3]]["video"] == "v3.mp4" and rows[names[3]]["camera"] == 2  # kept from the first run
    assert index.files.columns["frame"].dtype.kind == "i"
    # readable errors
    with pytest.raises(SearchError, match="no named group"):
        PathPattern(r"cam\d+")
    bad = tmp_path / "bad.json"
    bad.write_text('{"a.jpg": {"x": {"nested": 1}}}')
    with pytest.raises(SearchError, match="must be a number or a string"):
        read_sidecar(bad)
    with pytest.raises(SearchError, match="not a time"):
        parse_time("yesterday")


def test_filters_search_only_matching_rows(tmp_path, tiny_checkpoint, synth_root, capsys):
    """--where/--after/--before: hits are the exact top-k of the matching rows (brute force over the
    filtered subset), not a post-filtered top-k."""
    from lgur.checkpoint import load_model
    from lgur.search.filters import Filter, filter_from_request
    from lgur.search.index import parse_time

    base = parse_time("2026-11-28T14:00:00")
    out = tmp_path / "f.lgidx"
    paths = [p.relative_to(synth_root / "imgs").as_posix() for p in synth_images(synth_root)]
    meta = {p: {"camera": i % 4, "time": base + 60 * i, "video": f"v{i % 2}.mp4"} for i, p in enumerate(paths)}
    index, _ = build_index(tiny_checkpoint, synth_root / "imgs", out, num_workers=0, progress=False, metadata=meta)
    model = load_model(tiny_checkpoint)[0]
    query = "a man in a black jacket"
    q = model.encode_captions([query])[0]
    scores = index.embeddings.float() @ q
    cam = index.files.columns["camera"]
    t = index.files.columns["time"]

    def brute(mask, k=5):
        allowed = torch.from_numpy(np.flatnonzero(mask))
        return allowed[scores[allowed].argsort(descending=True)[:k]].tolist()

    searcher = Searcher(out)
    cases = [(["camera=3"], None, None, cam == 3),
             (["camera=1,2", "video=v0.mp4"], None, None, np.isin(cam, [1, 2]) & (index.files.columns["video"] == b"v0.mp4")),
             ([], "2026-11-28T14:30:00", "2026-11-28 15:00:00+00:00", (t >= base + 1800) & (t < base + 3600)),
             (["camera!=0"], int(base) + 600, None, (cam != 0) & (t >= base + 600))]
    for where, after, before, mask in cases:
        [res] = searcher.search([query], k=5, where=where, after=after, before=before)
        assert [h.id for h in res.hits] == brute(mask), (where, after, before)
        assert all(mask[h.id] for h in res.hits) and res.hits[0].meta["camera"] == int(cam[res.hits[0].id])
    # fewer matches than k: only those
    one = np.flatnonzero(t == t[7])
    [res] = searcher.search([query], k=5, after=float(t[7]), before=float(t[7]) + 1)
    assert [h.id for h in res.hits] == one.tolist()
    # the CLI prints the filter and the rows' metadata
    code, stdout, _ = run_cli(capsys, "search", "--index", out, query, "-k", "3", "--where", "camera=2")
    assert code == 0 and f"filter: camera=2: {int((cam == 2).sum())} of {len(index)} images" in stdout
    assert stdout.count("camera=2") == 4
    # readable errors
    for args, message in [(["--where", "floor=3"], "no column 'floor'"), (["--where", "camera=x"], "holds integers"),
                          (["--where", "video>a"], "supports = and != only"), (["--after", "noon"], "not a time"),
                          (["--where", "camera"], "expected COLUMN=VALUE")]:
        code, _, err = run_cli(capsys, "search", "--index", out, query, *args)
        assert code == 2 and message in err, (args, err)
    # the JSON API: the same fields, the same rows; bad filters are a 422 with the message
    from fastapi.testclient import TestClient

    from lgur.search.server import create_app

    client = TestClient(create_app(searcher))
    r = client.post("/api/search", json={"query": query, "k": 5, "where": ["camera=1,2", "video=v0.mp4"]})
    assert r.status_code == 200 and [h["id"] for h in r.json()["results"]] == brute(cases[1][3])
    assert r.json()["results"][0]["meta"]["video"] == "v0.mp4"
    r = client.post("/api/search", json={"query": query, "k": 5, "after": "2026-11-28T14:30:00", "before": base + 3600})
    assert [h["id"] for h in r.json()["results"]] == brute(cases[2][3])
    for body, message in [({"where": "floor=1"}, "no column 'floor'"), ({"where": {"camera": 3}}, "where"),
                          ({"after": "noon"}, "not a time")]:
        r = client.post("/api/search", json={"query": query, **body})
        assert r.status_code == 422 and message in r.json()["error"], (body, r.json())
    assert filter_from_request({"where": ["camera=3"], "after": 5}) == Filter.parse(["camera=3"], 5)
    for body in ({"where": {"camera": 3}}, {"after": [1]}, {"where": ["a=1"] * 17}, {"before": True}):
        with pytest.raises(SearchError):
            filter_from_request(body)


@pytest.mark.skipif(__import__("importlib").util.find_spec("faiss") is None, reason="faiss not installed")
@pytest.mark.parametrize("kind", ["ivfpq", "hnsw"])
def test_faiss_filter_is_applied_inside_the_search(kind):
    """The ID selector restricts faiss itself: every candidate is allowed, and with the filter the
    re-ranked top-10 matches the exact top-10 of the allowed rows (no over-fetch-and-drop)."""
    from lgur.search.ann import FaissSearch, TwoStageSearch, build_faiss, recall_at, recall_queries, synthetic_embeddings
    from lgur.search.topk import ExactSearch

    store = synthetic_embeddings(20000, 64, rank=16, seed=5)
    queries = recall_queries(store, 50, seed=6)
    index, param = build_faiss(store, kind)
    first = FaissSearch(index, param, 16 if kind == "ivfpq" else 64)
    subset = np.sort(np.random.default_rng(0).choice(len(store), 200, replace=False))  # 1 % of the rows
    engine = TwoStageSearch(first, store, None, 10)
    _, ids = engine.search(queries, 10, subset=subset)
    assert np.isin(ids.numpy(), subset).all()
    _, cand = first.search(queries, 100, subset=subset)
    assert np.isin(cand.numpy()[cand.numpy() >= 0], subset).all()
    if kind == "ivfpq":  # the probe count grew with the filter: the lists probed hold enough allowed rows
        assert (cand >= 0).sum() >= 50 * 50
    truth = ExactSearch(store).search(queries, 10, subset=subset)[1]
    assert recall_at(ids, truth) >= 0.9
    assert truth.numpy().tolist() == ExactSearch(store[subset]).search(queries, 10)[1].apply_(lambda i: int(subset[i])).tolist()


def test_writer_shards_and_multi_shard_search(tmp_path, monkeypatch):
    """Rows split over several memory-mapped shards (streamed, or held until full) read back in order;
    exact search, gathers and subsets across shard boundaries equal the one-matrix answers."""
    import lgur.search.index as index_mod
    from lgur.search.topk import ExactSearch, Shards

    one = fake_index(50, d=8, seed=3)
    for total in (True, False):
        path = tmp_path / f"s{total}.lgidx"
        with index_mod.IndexWriter(path) as w:
            blocks = (one.embeddings[i:i + 7] for i in range(0, 50, 7))
            w.write_embeddings(blocks, "fp16", shard_rows=16, total=50 if total else None)
            w.write_rows(one.files)
            w.commit(one.manifest)
        idx = GalleryIndex.load(path)
        assert [s["rows"] for s in idx.manifest["shards"]] == [16, 16, 16, 2] and len(idx.store.parts) == 4
        assert torch.equal(idx.embeddings, one.embeddings) and idx.files.paths() == one.files.paths()
        ids = torch.tensor([[0, 15, 16, 49], [33, 2, 31, 48]])
        assert torch.equal(idx.store.take(ids), one.embeddings[ids])
        q = torch.nn.functional.normalize(torch.randn(3, 8), dim=1)
        ref = ExactSearch(one.embeddings, "fp32").search(q, 5)
        got = ExactSearch(idx.store, "fp32", chunk_rows=5).search(q, 5)
        assert torch.equal(got[1], ref[1])
        subset = np.array([1, 15, 17, 30, 47, 49])
        got = ExactSearch(idx.store, chunk_rows=4).search(q, 8, subset=subset)
        brute = torch.from_numpy(subset)[(q @ one.embeddings[subset].float().T).argsort(1, descending=True)]
        assert torch.equal(got[1][:, :6], brute) and (got[1][:, 6:] == -1).all()
    assert isinstance(idx.store, Shards) and idx.store.mapped


def test_filter_router_scans_small_subsets_exactly():
    """A filter keeping few rows is searched by an exact scan of those rows, a large one through the ANN
    with its ID selector; unfiltered queries always go to the ANN."""
    from lgur.search.searcher import FilterRouter

    calls = []

    class Spy:
        first, store = "first", "store"

        def __init__(self, name):
            self.name = name

        def __len__(self):
            return 100

        def search(self, q, k, subset=None):
            calls.append((self.name, None if subset is None else len(subset)))
            return "ok"

    router = FilterRouter(Spy("ann"), Spy("exact"), max_rows=10)
    router.search(None, 5)
    router.search(None, 5, subset=np.arange(10))
    router.search(None, 5, subset=np.arange(11))
    assert calls == [("ann", None), ("exact", 10), ("ann", 11)]
