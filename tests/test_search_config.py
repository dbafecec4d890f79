"""`lgur index/search/serve/export` take --config and key=value overrides of the keys they read (search.*,
device; index --video: video.*; export: export.*); model.* and data.* come from the checkpoint and are
refused with a readable error."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

from lgur.cli import main
from lgur.config import DEFAULTS_PATH, defaults, load_command_config
from lgur.errors import ConfigError
from lgur.search.cli import split_query_overrides


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from lgur.checkpoint import save_model
    from lgur.config import load_config
    from lgur.models import build_model

    cfg = load_config("lgur_tiny")
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ck") / "tiny.safetensors"
    save_model(build_model(cfg, 0, pretrained=False), cfg, path, 0)
    return path


@pytest.fixture(scope="module")
def gallery(tmp_path_factory, synth_root) -> Path:
    out = tmp_path_factory.mktemp("gallery")
    for src in sorted((synth_root / "imgs").rglob("*.jpg"))[:6]:
        shutil.copy(src, out / src.name)
    return out


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_every_search_key_is_commented_and_settable():
    text = DEFAULTS_PATH.read_text()
    section = re.search(r"^search:.*?\n((?:  .*\n)+)", text, re.M).group(1)
    lines = [line for line in section.splitlines() if re.match(r"  \w+:", line)]
    assert {line.split(":")[0].strip() for line in lines} == set(defaults().search)
    assert all("#" in line for line in lines), [line for line in lines if "#" not in line]
    for key, value in defaults().search.items():
        new = value * 2 if isinstance(value, (int, float)) and not isinstance(value, bool) else value
        cfg = load_command_config(None, [f"search.{key}={new}"], "search", ("search",))
        assert cfg.search[key] == new and type(cfg.search[key]) is type(value)


def test_command_config_refuses_model_and_foreign_keys():
    cfg = load_command_config(None, ["search.rerank=20", "device=cpu"], "search", ("search",))
    assert cfg.search.rerank == 20 and cfg.device == "cpu"
    with pytest.raises(ConfigError, match=r"'model.dim' cannot be overridden for `lgur search`: the checkpoint"):
        load_command_config(None, ["model.dim=32"], "search", ("search",))
    with pytest.raises(ConfigError, match=r"'data.image_size' cannot be overridden.*checkpoint"):
        load_command_config(None, ["data.image_size=[64, 32]"], "serve", ("search",))
    with pytest.raises(ConfigError, match=r"'optim.epochs' is not read by `lgur search`; overrides here may set search.\*, device"):
        load_command_config(None, ["optim.epochs=3"], "search", ("search",))
    with pytest.raises(ConfigError, match=r"'video.fps' is not read"):
        load_command_config(None, ["video.fps=5"], "index", ("search",))
    assert load_command_config(None, ["video.fps=5"], "index --video", ("search", "video")).video.fps == 5.0
    with pytest.raises(ConfigError, match=r"'search.rerank' must be an integer"):
        load_command_config(None, ["search.rerank=ten"], "search", ("search",))
    with pytest.raises(ConfigError, match=r"unknown config key 'search.nope'"):
        load_command_config(None, ["search.nope=1"], "search", ("search",))
    with pytest.raises(ConfigError, match=r"'device' is not read"):
        load_command_config(None, ["device=cpu"], "export", ("export",), keys=())


def test_search_positionals_split_into_queries_and_overrides():
    words = ["a man in a red coat", "search.rerank=20", "device=cpu", "hat=red", "model.dim=3", "x = y"]
    queries, overrides = split_query_overrides(words)
    assert queries == ["a man in a red coat", "hat=red", "x = y"]
    assert overrides == ["search.rerank=20", "device=cpu", "model.dim=3"]


def test_index_search_serve_export_read_config_and_overrides(checkpoint, gallery, tmp_path, capsys, monkeypatch):
    # index: search.dtype from the override, search.batch_size from a recipe file
    recipe = tmp_path / "deploy.yaml"
    recipe.write_text("search:\n  batch_size: 4\n  max_k: 7\n  rerank: 3\n")
    out = tmp_path / "g.lgidx"
    code, stdout, err = run(capsys, "index", "--checkpoint", checkpoint, "--images", gallery, "--out", out,
                            "--workers", "0", "--quiet", "--config", recipe, "search.dtype=fp32", "device=cpu")
    assert code == 0, err
    from lgur.search.index import GalleryIndex

    assert GalleryIndex.load(out).manifest["dtype"] == "fp32"  # the default is fp16

    import lgur.search.searcher as searcher_mod
    import lgur.search.server as server_mod

    seen = []

    class Spy(searcher_mod.Searcher):
        def __init__(self, *args, **kwargs):
            seen.append(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(searcher_mod, "Searcher", Spy)
    code, stdout, err = run(capsys, "search", "--index", out, "--config", recipe, "-k", "2", "a person in red",
                            "search.text_batch_size=1", "device=cpu")
    assert code == 0, err
    assert seen[-1]["search_cfg"].text_batch_size == 1 and seen[-1]["search_cfg"].rerank == 3
    assert seen[-1]["device"] == "cpu"
    assert stdout.count("query: ") == 1 and "a person in red" in stdout and "text_batch_size" not in stdout

    served = []
    monkeypatch.setattr(server_mod, "serve", lambda searcher, host, port, **limits: served.append(searcher))
    code, _, err = run(capsys, "serve", "--index", out, "--config", recipe, "search.serve_batch_max=1")
    assert code == 0, err
    assert served[-1].cfg.max_k == 7 and served[-1].cfg.serve_batch_max == 1
    app = server_mod.create_app(served[-1])
    from fastapi.testclient import TestClient

    with TestClient(app) as client:
        assert client.post("/api/search", json={"query": "a person", "k": 8}).status_code == 422  # max_k = 7
        assert client.post("/api/search", json={"query": "a person", "k": 7}).status_code == 200

    import lgur.export.onnx as onnx_mod

    opsets = []
    monkeypatch.setattr(onnx_mod, "export_onnx", lambda ck, o, opset: opsets.append(opset) or "ok")
    assert run(capsys, "export", "--checkpoint", checkpoint, "--out", tmp_path / "x", "export.opset=16")[0] == 0
    assert run(capsys, "export", "--checkpoint", checkpoint, "--out", tmp_path / "x", "--opset", "18")[0] == 0
    assert opsets == [16, 18]


@pytest.mark.parametrize("argv", [
    ("search", "--index", "{idx}", "a man", "model.dim=32"),
    ("serve", "--index", "{idx}", "model.num_prototypes=3"),
    ("index", "--checkpoint", "{ck}", "--images", "{gal}", "--out", "{idx}", "data.image_size=[64, 32]"),
    ("export", "--checkpoint", "{ck}", "--out", "{idx}", "search.rerank=3"),
])
def test_model_overrides_are_refused_before_anything_runs(argv, checkpoint, gallery, tmp_path, capsys):
    idx = tmp_path / "never.lgidx"
    argv = [a.format(idx=idx, ck=checkpoint, gal=gallery) for a in argv]
    code, _, err = run(capsys, *argv)
    assert code == 2 and err.startswith(f"lgur {argv[0]}: error: ") and "Traceback" not in err
    assert "checkpoint's own config" in err or "is not read by" in err
    assert not idx.exists()


def test_index_video_reads_video_and_search_overrides(checkpoint, tmp_path, capsys, monkeypatch):
    import lgur.video.ingest as ingest
    from lgur.errors import LgurError

    seen = []

    def fake_index_video(ck, video, out, settings, **kwargs):
        seen.append((settings, kwargs))
        raise LgurError("stopped by the test")

    monkeypatch.setattr(ingest, "index_video", fake_index_video)
    argv = ["index", "--video", tmp_path / "v.mp4", "--checkpoint", checkpoint, "--out", tmp_path / "v.lgidx"]
    code, _, err = run(capsys, *argv, "--min-height", "30", "video.fps=5", "video.min_height=60",
                       "search.batch_size=3", "device=cpu")
    assert code == 2 and "stopped by the test" in err
    settings, kwargs = seen[-1]
    assert settings.fps == 5.0 and settings.min_height == 30  # the flag wins over the override
    assert kwargs["search_cfg"].batch_size == 3 and kwargs["batch_size"] == 3 and kwargs["device"] == "cpu"
    code, _, err = run(capsys, *argv, "model.dim=8")
    assert code == 2 and "'model.dim' cannot be overridden for `lgur index --video`" in err and len(seen) == 1


def test_faiss_threads_override_reaches_faiss():
    faiss = pytest.importorskip("faiss")
    from lgur.search.cli import apply_faiss_threads

    cfg = load_command_config(None, ["search.faiss_threads=2"], "search", ("search",))
    try:
        apply_faiss_threads(cfg.search)
        assert faiss.omp_get_max_threads() == 2
    finally:  # what lgur.search.ann sets on its first faiss import, for the rest of the session
        faiss.omp_set_num_threads(int(defaults().search.faiss_threads))
