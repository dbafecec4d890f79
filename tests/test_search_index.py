"""`lgur index` / `lgur search` / Searcher on a tiny synthetic gallery and the tiny random-init model."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from lgur.cli import main
from lgur.search.index import GalleryIndex, SearchError, build_index
from lgur.search.searcher import Searcher


def make_checkpoint(path: Path, seed: int) -> Path:
    from lgur.checkpoint import save_model
    from lgur.config import load_config
    from lgur.models import build_model

    cfg = load_config("lgur_tiny")
    torch.manual_seed(seed)
    save_model(build_model(cfg, 0, pretrained=False), cfg, path, 0)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ck") / "tiny.safetensors", seed=0)


@pytest.fixture(scope="session")
def built_index(tmp_path_factory, tiny_checkpoint, synth_root) -> Path:
    """Index of the whole synthetic gallery (96 images)."""
    out = tmp_path_factory.mktemp("idx") / "gallery.lgidx"
    build_index(tiny_checkpoint, synth_root / "imgs", out, num_workers=0, progress=False)
    return out


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


def test_other_model_is_refused(tmp_path, built_index, tiny_checkpoint, synth_root, capsys):
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
    assert re.search(r"PCA 192 -> 32: recall@10 [\d.]+ with re-ranking", stdout)
    assert re.search(r"ANN hnsw over 32-d vectors.*efSearch=\d+: recall@10 [\d.]+", stdout)
    manifest = json.loads((copy / "manifest.json").read_text())
    assert manifest["pca"]["dim"] == 32 and manifest["ann"]["kind"] == "hnsw"
    assert 0 <= manifest["ann"]["recall@10"] <= 1 and (copy / "ann.faiss").is_file()
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
    assert manifest["pca"] is None and manifest["ann"] is None and not (copy / "ann.faiss").exists()
    with pytest.raises(SearchError, match="no ANN index"):
        Searcher(copy, mode="ann")
