"""Hostile and broken files handed to lgur (lgur.files, lgur.checkpoint): no code in a file ever runs, every
refusal is a readable one-line error, and a model's identity is computed from its tensors and config.

Each attack file would leave a marker file if its code ran; the tests assert the marker is absent."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lgur.checkpoint import load_model, model_fingerprint, read_metadata, save_model, tensors_fingerprint
from lgur.cli import main
from lgur.config import load_config
from lgur.errors import LgurError, WeightsError
from lgur.files import TORCHSCRIPT, read_any, read_safetensors, read_torch, sniff


# ------------------------------------------------------------------------------------------ attack files

class Payload:
    """Unpickling this creates the marker file (builtins.open, the way a real exploit would start)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


class ScriptedPayload(torch.nn.Module):
    """A TorchScript module whose __setstate__ (run by torch.jit.load) writes the marker file."""

    def __init__(self, marker: str):
        super().__init__()
        self.marker = marker
        self.weight = torch.nn.Parameter(torch.ones(2))

    def forward(self, x):
        return x * self.weight

    @torch.jit.export
    def __getstate__(self):
        return (self.marker, self.weight, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, torch.Tensor, bool]):
        self.marker = state[0]
        self.weight = state[1]
        # from_file(shared=True) creates and maps the file: 4 bytes 'AAAA' are written to disk
        written = torch.from_file(self.marker, True, 4, dtype=torch.uint8).fill_(65)
        self.training = state[2] and bool(written[0] == 65)


def _tensors() -> dict[str, torch.Tensor]:
    return {"weight": torch.ones(3, 3), "bias": torch.zeros(3)}


def pickle_zip(path: Path, marker: Path) -> Path:
    """torch.save (zip format) of a state dict with a __reduce__ payload beside the tensors."""
    torch.save({"state_dict": _tensors(), "network": _tensors(), "payload": Payload(marker)}, path)
    return path


def pickle_legacy(path: Path, marker: Path) -> Path:
    torch.save({"state_dict": _tensors(), "payload": Payload(marker)}, path, _use_new_zipfile_serialization=False)
    return path


def plain_pickle(path: Path, marker: Path) -> Path:
    path.write_bytes(pickle.dumps(Payload(marker), protocol=4))
    return path


def torchscript(path: Path, marker: Path) -> Path:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script is deprecated
        torch.jit.save(torch.jit.script(ScriptedPayload(str(marker))), str(path))
    return path


def torchscript_disguised(path: Path, marker: Path) -> Path:
    """The TorchScript archive with constants.pkl dropped (torch's own TorchScript check looks for it)."""
    src = torchscript(path.with_suffix(".ts"), marker)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(path, "w") as zout:
        for item in zin.infolist():
            if not item.filename.endswith("constants.pkl"):
                zout.writestr(item, zin.read(item.filename))
    return path


def zip_code_payload(path: Path, marker: Path) -> Path:
    """A zip that looks like a torch.save archive: data.pkl is a pickle whose code writes the marker, plus a
    Python file in the archive."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(Payload(marker), protocol=2))
        z.writestr("archive/version", "3\n")
        z.writestr("archive/__main__.py", f"open({str(marker)!r}, 'w')\n")
    return path


ATTACKS = {"pickle_zip": pickle_zip, "pickle_legacy": pickle_legacy, "plain_pickle": plain_pickle,
           "torchscript": torchscript, "torchscript_disguised": torchscript_disguised,
           "zip_code_payload": zip_code_payload}


@pytest.fixture(params=sorted(ATTACKS))
def attack(request, tmp_path):
    marker = tmp_path / "PWNED"
    path = ATTACKS[request.param](tmp_path / f"{request.param}.pth", marker)
    assert not marker.exists()
    return request.param, path, marker


def test_torchscript_payload_really_runs_under_jit_load(tmp_path):
    """The TorchScript attack file is real: torch.jit.load (what lgur called before) writes the marker."""
    marker = tmp_path / "PWNED"
    path = torchscript(tmp_path / "clip.pt", marker)
    torch.jit.load(str(path))
    assert marker.read_bytes() == b"AAAA"


def _readable(err: str, path: Path) -> None:
    assert "Traceback" not in err and err.count("\n") == 1 and path.name in err, err


def test_every_loader_refuses_every_attack_file(attack, tmp_path):
    name, path, marker = attack
    with pytest.raises(WeightsError) as e:
        read_any(path)
    assert path.name in str(e.value)
    if "torchscript" in name:
        assert "TorchScript" in str(e.value) and "safetensors" in str(e.value)
    else:
        assert "weights_only" in str(e.value) or "not a PyTorch checkpoint" in str(e.value)
    with pytest.raises(LgurError):
        read_torch(path, "a training state file")  # the resume-state loader
    with pytest.raises(WeightsError, match="safetensors"):
        read_safetensors(path)
    with pytest.raises(WeightsError, match="safetensors"):
        load_model(path)
    assert not marker.exists()


def test_cli_refuses_every_attack_file_readably(attack, tmp_path, synth_root, capsys):
    """As backbone weights, as an official checkpoint, as a model file for eval and for index."""
    from lgur.models.backbones import build_image_backbone

    name, path, marker = attack
    mcfg = load_config().model
    mcfg.image_weights = str(path)
    with pytest.raises(WeightsError):
        build_image_backbone(mcfg, (64, 32), pretrained=True)
    runs = [["convert-official", path, tmp_path / "out.safetensors", "--config", "lgur_tiny"],
            ["eval", "--checkpoint", path, "--data-root", synth_root, "--workers", "0"],
            ["index", "--checkpoint", path, "--images", synth_root / "imgs", "--out", tmp_path / "g.lgidx"]]
    for argv in runs:
        assert main([str(a) for a in argv]) == 2
        _readable(capsys.readouterr().err, path)
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("case", ["empty", "garbage", "truncated_safetensors", "huge_header", "lying_header",
                                  "truncated_zip", "random_zip"])
def test_broken_files_are_readable_errors(case, tmp_path, capsys):
    path = tmp_path / f"{case}.safetensors"
    good = tmp_path / "good.safetensors"
    save_file(_tensors(), str(good), metadata={"format": "x"})
    raw = good.read_bytes()
    if case == "empty":
        path.write_bytes(b"")
    elif case == "garbage":
        path.write_bytes(os.urandom(4096))
    elif case == "truncated_safetensors":
        path.write_bytes(raw[:-7])
    elif case == "huge_header":  # what safetensors reports as "header too large"
        path.write_bytes(struct.pack("<Q", 1 << 40) + b"{" + b" " * 64)
    elif case == "lying_header":  # a tensor whose offsets point past the end of the file
        header = json.dumps({"w": {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 4_000_000]}}).encode()
        path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    elif case == "truncated_zip":
        torch.save(_tensors(), path)
        path.write_bytes(path.read_bytes()[:300])
    else:
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("readme.txt", "hello")
    for load in (read_any, load_model, read_metadata):
        with pytest.raises(WeightsError) as e:
            load(path)
        assert path.name in str(e.value)
    assert main(["eval", "--checkpoint", str(path), "--data-root", str(tmp_path)]) == 2
    _readable(capsys.readouterr().err, path)


def test_official_pth_tar_points_to_convert_official(tmp_path, synth_root, capsys):
    path = tmp_path / "best.pth.tar"
    torch.save({"network": _tensors(), "epoch": 3}, path)
    for argv in (["eval", "--checkpoint", path, "--data-root", synth_root],
                 ["index", "--checkpoint", path, "--images", synth_root / "imgs", "--out", tmp_path / "g.lgidx"]):
        assert main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err
        assert f"lgur convert-official {path}" in err and "header too large" not in err.lower()
        _readable(err, path)


def test_sniff_recognises_formats_by_content(tmp_path):
    ts = torchscript(tmp_path / "weights.safetensors", tmp_path / "PWNED")  # the suffix lies
    assert sniff(ts) == TORCHSCRIPT
    assert not (tmp_path / "PWNED").exists()


# --------------------------------------------------------------------------------------- model identity

def _tiny(seed: int = 0, **model_over):
    from lgur.models import build_model

    cfg = load_config("lgur_tiny")
    for k, v in model_over.items():
        cfg.model[k] = v
    torch.manual_seed(seed)
    return build_model(cfg, 0, pretrained=False).eval(), cfg


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("identity")
    a, cfg = _tiny(0)
    b, _ = _tiny(1)
    save_model(a, cfg, d / "a.safetensors", 0)
    save_model(b, cfg, d / "b.safetensors", 0)
    return d


def test_fingerprint_is_computed_from_tensors_and_config(saved):
    model, cfg, meta = load_model(saved / "a.safetensors")
    state = {k: v for k, v in load_file(str(saved / "a.safetensors")).items()}
    assert meta["fingerprint"] == model_fingerprint(state, json.loads(json.dumps(cfg.to_dict()))) != \
        tensors_fingerprint(state)
    assert meta["fingerprint"] != load_model(saved / "b.safetensors")[2]["fingerprint"]
    # where the weights came from is not part of the identity; the image size is
    other = json.loads(json.dumps(cfg.to_dict()))
    other["model"]["image_weights"] = "/elsewhere/deit.pth"
    assert model_fingerprint(state, other) == meta["fingerprint"]
    other["data"]["image_size"] = [256, 128]
    assert model_fingerprint(state, other) != meta["fingerprint"]


def _copy_metadata(src: Path, tensors_from: Path, dst: Path) -> Path:
    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata()
    save_file(load_file(str(tensors_from)), str(dst), metadata=meta)
    return dst


def test_other_tensors_with_copied_metadata_are_refused(saved, tmp_path, capsys):
    fake = _copy_metadata(saved / "a.safetensors", saved / "b.safetensors", tmp_path / "fake.safetensors")
    assert read_metadata(fake)["fingerprint"] == read_metadata(saved / "a.safetensors")["fingerprint"]
    with pytest.raises(WeightsError, match="corrupt model file"):
        load_model(fake)


def test_bit_rot_is_refused(saved, tmp_path):
    rotten = tmp_path / "rotten.safetensors"
    raw = bytearray((saved / "a.safetensors").read_bytes())
    raw[-1001] ^= 0x10  # one bit of one weight
    rotten.write_bytes(bytes(raw))
    with pytest.raises(WeightsError, match="corrupt model file"):
        load_model(rotten)


def test_same_tensors_with_other_head_settings_are_another_model(tmp_path, synth_root):
    """Converted (or re-saved) with other head counts: same tensor shapes and bytes, other computation."""
    from lgur.search.index import SearchError, build_index
    from lgur.search.searcher import Searcher

    model, cfg = _tiny(0)
    heads, head_dim = cfg.model.recon_heads, cfg.model.recon_head_dim
    assert head_dim % 2 == 0
    other_model, other_cfg = _tiny(0, recon_heads=heads * 2, recon_head_dim=head_dim // 2)
    other_model.load_state_dict(model.state_dict())  # identical tensors
    a, b = save_model(model, cfg, tmp_path / "a.safetensors", 0), save_model(other_model, other_cfg,
                                                                             tmp_path / "b.safetensors", 0)
    assert a != b
    x = torch.randn(2, 3, *cfg.data.image_size)
    with torch.no_grad():
        assert not torch.allclose(model.encode_images(x), other_model.encode_images(x), atol=1e-4)
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    for f in sorted((synth_root / "imgs").rglob("*.jpg"))[:4]:
        shutil.copy(f, gallery / f.name)
    build_index(tmp_path / "a.safetensors", gallery, tmp_path / "g.lgidx", num_workers=0, progress=False)
    with pytest.raises(SearchError, match="is not the model that built"):
        Searcher(tmp_path / "g.lgidx", checkpoint=tmp_path / "b.safetensors")
    # the other head settings with the index's fingerprint copied into the metadata: refused as corrupt
    from safetensors import safe_open

    with safe_open(str(tmp_path / "b.safetensors"), framework="pt") as f:
        meta = f.metadata()
    fake = tmp_path / "fake.safetensors"
    save_file(load_file(str(tmp_path / "b.safetensors")), str(fake), metadata={**meta, "fingerprint": a})
    with pytest.raises(WeightsError, match="corrupt model file"):
        Searcher(tmp_path / "g.lgidx", checkpoint=fake)
    assert Searcher(tmp_path / "g.lgidx").search("a man", k=1)[0].hits


def test_lgur_model_1_files_still_load_and_are_verified(saved, tmp_path):
    """Files written before the config joined the fingerprint carry a tensors-only one: still verified."""
    from safetensors import safe_open

    state = load_file(str(saved / "a.safetensors"))
    with safe_open(str(saved / "a.safetensors"), framework="pt") as f:
        meta = f.metadata()
    old = tmp_path / "old.safetensors"
    save_file(state, str(old), metadata={**meta, "format": "lgur-model-1", "fingerprint": tensors_fingerprint(state)})
    assert load_model(old)[2]["fingerprint"] == load_model(saved / "a.safetensors")[2]["fingerprint"]
    state["proj.weight"] = state["proj.weight"] + 1
    save_file(state, str(old), metadata={**meta, "format": "lgur-model-1"})
    with pytest.raises(WeightsError, match="corrupt model file"):
        load_model(old)


# ---------------------------------------------------------------------------------------------- friction

@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_respect_the_umask(tmp_path, umask):
    model, cfg = _tiny(0)
    old = os.umask(umask)
    try:
        path = tmp_path / "m.safetensors"
        save_model(model, cfg, path, 0)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_pyproject_has_an_spdx_license_without_setuptools_warnings(monkeypatch):
    import warnings

    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = apply_configuration(Distribution(), root / "pyproject.toml")
    assert dist.metadata.license_expression == "MIT"
    assert not [w for w in caught if "license" in str(w.message).lower()]


@pytest.fixture(scope="module")
def bf16_trained(tmp_path_factory):
    """A tiny model file whose config says it trained with train.amp=bf16."""
    model, cfg = _tiny(0)
    cfg.train.amp = "bf16"
    path = tmp_path_factory.mktemp("bf16") / "m.safetensors"
    save_model(model, cfg, path, 0)
    return path


def _capture_eval_dtype(monkeypatch) -> list:
    from lgur.engine import evaluation

    seen, real = [], evaluation.evaluate

    def spy(model, split, device, dtype, *args, **kwargs):
        seen.append(dtype)
        return real(model, split, device, dtype, *args, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate", spy)
    return seen


def test_eval_defaults_to_fp32_whatever_the_training_precision(bf16_trained, synth_root, monkeypatch, capsys):
    seen = _capture_eval_dtype(monkeypatch)
    assert main(["eval", "--checkpoint", str(bf16_trained), "--data-root", str(synth_root), "--workers", "0"]) == 0
    assert main(["eval", "--checkpoint", str(bf16_trained), "--data-root", str(synth_root), "--workers", "0",
                 "--amp", "bf16"]) == 0
    assert seen == [None, torch.bfloat16]  # None: float32


def test_eval_on_a_dataset_with_only_a_test_split(bf16_trained, synth_root, tmp_path, capsys):
    records = [r for r in json.loads((synth_root / "reid_raw.json").read_text()) if r["split"] == "test"]
    root = tmp_path / "test_only"
    root.mkdir()
    (root / "reid_raw.json").write_text(json.dumps(records))
    (root / "imgs").symlink_to(synth_root / "imgs")
    assert main(["eval", "--checkpoint", str(bf16_trained), "--data-root", str(root), "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert f"{sum(len(r['captions']) for r in records)} captions x {len(records)} images" in out
    assert main(["eval", "--checkpoint", str(bf16_trained), "--data-root", str(root), "--split", "val"]) == 2
    assert "no usable 'val' records" in capsys.readouterr().err
