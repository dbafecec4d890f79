"""`lgur index --nproc 2` (two CPU processes, gloo, under torchrun) against the single-process index:
same rows in the same order, same embeddings within fp16 storage precision; incremental updates encode
only new files; a rank that dies leaves the previous index in place."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lgur.search.index import GalleryIndex, build_index

SRC = Path(__file__).resolve().parents[1] / "src"


def _index_nproc(checkpoint, gallery, out, extra_path: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(str(p) for p in (extra_path, SRC) if p)}
    return subprocess.run(["timeout", "240", sys.executable, "-m", "lgur", "index", "--nproc", "2", "--checkpoint",
                           str(checkpoint), "--images", str(gallery), "--out", str(out), "--workers", "0", "--quiet"],
                          env=env, capture_output=True, text=True)


@pytest.mark.slow  # lgur index --nproc 2 (torchrun), three times
def test_two_process_index_equals_single_process(tmp_path, synth_root, tiny_checkpoint):
    checkpoint = tiny_checkpoint
    images = sorted((synth_root / "imgs").rglob("*.jpg"))
    gallery = tmp_path / "gallery"
    for i, src in enumerate(images[:13]):
        dst = gallery / f"cam{i % 3}" / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)
    (gallery / "cam1" / "broken.jpg").write_bytes(b"not an image")
    single, _ = build_index(checkpoint, gallery, tmp_path / "one.lgidx", num_workers=0, progress=False)

    out = tmp_path / "two.lgidx"
    proc = _index_nproc(checkpoint, gallery, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "kept 0, added 13 (0 changed), removed 0, skipped 1 unreadable" in proc.stdout
    assert "2 processes" in proc.stdout and proc.stdout.count("index written to") == 1  # rank 0 reports
    two = GalleryIndex.load(out)
    assert two.files.paths() == single.files.paths() and two.manifest["processes"] == 2
    assert [s["path"] for s in two.manifest["skipped"]] == ["cam1/broken.jpg"]
    torch.testing.assert_close(two.embeddings.float(), single.embeddings.float(), atol=2e-3, rtol=0)  # fp16 rows

    # rank 1 dies hard (os._exit) while encoding: the run fails, the previous index stays current
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    import lgur.search.index as m\n"
        "    def die(*a, **k):\n"
        "        os._exit(3)\n"
        "    m.encode_files = die\n")
    for src in images[13:17]:
        shutil.copy(src, gallery / "cam2" / f"new_{src.name}")
    proc = _index_nproc(checkpoint, gallery, out, extra_path=hook)
    assert proc.returncode != 0
    after = GalleryIndex.load(out)
    assert after.files.paths() == two.files.paths() and torch.equal(after.embeddings, two.embeddings)
    # the next run encodes only the new files (split over the two ranks) and removes the dead run's leftovers
    proc = _index_nproc(checkpoint, gallery, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "kept 13, added 4 (0 changed)" in proc.stdout
    grown = GalleryIndex.load(out)
    assert len(grown) == 17 and grown.files.paths() == sorted(grown.files.paths())
    assert len(list(out.glob("data-*"))) == 1
    old = dict(zip(two.files.paths(), two.embeddings))
    for p, e in zip(grown.files.paths(), grown.embeddings):
        if p in old:
            assert torch.equal(e, old[p])  # reused rows are the stored bytes
