"""`lgur convert-official`: a synthetic official checkpoint (official key names and layouts from the
fixture README, tiny widths) converts into an lgur model file that reproduces the source weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lgur.checkpoint import load_model
from lgur.cli import main
from lgur.config import load_config
from lgur.errors import WeightsError
from lgur.models import build_model
from lgur.models.convert import convert_official, read_official_checkpoint

TINY = "lgur_tiny"


class NotATensor:  # an arbitrary pickled object: weights_only loading must refuse it
    pass


def official_names(model) -> tuple[dict, dict]:
    """The official `network` and `W` state dicts holding `model`'s weights (README table layouts)."""
    net = {}
    for official, block in (("TXTDecoder_2", model.dga.recon), ("TXTDecoder", model.decoder.block)):
        for i, layer in enumerate(block.layers):
            p = f"{official}.transformer.layers.{i}"
            net[f"{p}.0.fn.norm.weight"], net[f"{p}.0.fn.norm.bias"] = layer.attn.norm.weight, layer.attn.norm.bias
            net[f"{p}.0.fn.fn.to_q.weight"] = layer.attn.to_q.weight
            net[f"{p}.0.fn.fn.to_kv.weight"] = layer.attn.to_kv.weight
            net[f"{p}.0.fn.fn.to_out.0.weight"], net[f"{p}.0.fn.fn.to_out.0.bias"] = (layer.attn.to_out.weight,
                                                                                     layer.attn.to_out.bias)
            net[f"{p}.1.fn.norm.weight"], net[f"{p}.1.fn.norm.bias"] = layer.ffn.norm.weight, layer.ffn.norm.bias
            net[f"{p}.1.fn.fn.net.0.weight"], net[f"{p}.1.fn.fn.net.0.bias"] = layer.ffn.fc1.weight, layer.ffn.fc1.bias
            net[f"{p}.1.fn.fn.net.3.weight"], net[f"{p}.1.fn.fn.net.3.bias"] = layer.ffn.fc2.weight, layer.ffn.fc2.bias
    net["dict_feature"] = model.dga.dictionary.atoms[None]
    net["query_embed_image"] = model.decoder.prototypes[None]
    net["mask.0.weight"], net["mask.0.bias"] = model.dga.gate.proj.weight, model.dga.gate.proj.bias
    for k in range(model.num_parts):
        net[f"conv_1X1_2.{k}.block.0.weight"] = model.proj.weight[k][:, :, None, None]
    net["pos_embed_image"] = torch.randn(1, 48, 1024)  # unused by the official forward
    for name, t in model.text.lstm.state_dict().items():
        net[f"TextExtract.lstm.{name}"] = t
    for name, t in model.text.backbone.state_dict().items():
        net[f"TextExtract.text_embed.{name}"] = t
    hidden = model.text.backbone.config.hidden_size
    net["TextExtract.text_embed.pooler.dense.weight"] = torch.randn(hidden, hidden)  # BERT pooler: unused
    net["TextExtract.text_embed.pooler.dense.bias"] = torch.randn(hidden)
    net["TextExtract.text_embed.embeddings.position_ids"] = torch.arange(512)[None]  # old-transformers buffer
    image = model.image.model.state_dict()
    for name, t in image.items():
        net[f"ImageExtract.model.{name}"] = t
    last = len(model.image.model.blocks)  # the official DeiT has one more block, never run
    for name, t in image.items():
        if name.startswith("blocks.0."):
            net[f"ImageExtract.model.blocks.{last}." + name[len("blocks.0."):]] = torch.randn_like(t)
    dim = model.image.model.embed_dim
    net["ImageExtract.model.norm.weight"], net["ImageExtract.model.norm.bias"] = torch.ones(dim), torch.zeros(dim)
    net["ImageExtract.model.fc.weight"], net["ImageExtract.model.fc.bias"] = torch.randn(10, dim), torch.zeros(10)
    W = {}
    for k in range(model.num_parts):
        W[f"{k}.W.block.weight"], W[f"{k}.W.block.bias"] = model.classifiers.weight[k], model.classifiers.bias[k]
    clone = lambda d: {k: v.detach().clone().contiguous() for k, v in d.items()}  # noqa: E731
    return clone(net), clone(W)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model(load_config(TINY), num_classes=5, pretrained=False).eval()
    with torch.no_grad():
        model.classifiers.bias.normal_()  # non-zero so a bias mix-up would show
    net, W = official_names(model)
    param = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.Adam([param])
    param.sum().backward()
    opt.step()
    path = tmp_path_factory.mktemp("official") / "best.pth.tar"
    test_best = np.zeros(2)[0] + 0.61  # the official script saves its R@1 as a numpy float64
    torch.save({"network": net, "W": W, "optimizer": opt.state_dict(), "epoch": 7, "test_best": test_best}, path)
    return model, net, W, path


def test_cli_converts_official_checkpoint_faithfully(source, tmp_path, capsys):
    model, _, _, path = source
    out = tmp_path / "converted.safetensors"
    assert main(["convert-official", str(path), str(out), "--config", TINY]) == 0
    printed = capsys.readouterr().out
    assert "5 ID classes" in printed
    report = convert_official(path, tmp_path / "again.safetensors", TINY)
    dropped = [line.strip() for line in printed.splitlines() if line.startswith("  ")]
    assert dropped == report["ignored"] and f"dropped {len(dropped)} official tensors" in printed
    assert {"pos_embed_image", "TextExtract.text_embed.pooler.dense.weight", "ImageExtract.model.fc.weight"} <= set(dropped)
    converted, cfg, meta = load_model(out, with_classifiers=True)
    assert meta["num_classes"] == 5 and meta["extra"]["official"] == {"epoch": 7, "test_best": 0.61}
    for key in ("dim", "embed_dim", "dict_size", "num_prototypes", "recon_head_dim", "pgu_head_dim", "pgu_ffn"):
        assert cfg.model[key] == load_config(TINY).model[key], key
    ours, theirs = converted.state_dict(), model.state_dict()
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    images = torch.randn(2, 3, *cfg.data.image_size)
    with torch.no_grad():
        assert torch.equal(converted.encode_images(images), model.encode_images(images))


def test_unmapped_and_missing_keys_are_loud(source, tmp_path, capsys):
    _, net, W, _ = source
    extra = tmp_path / "extra.pth.tar"
    torch.save({"network": {**net, "bottleneck.weight": torch.ones(3)}, "W": W}, extra)
    assert main(["convert-official", str(extra), str(tmp_path / "a.safetensors"), "--config", TINY]) == 2
    assert "bottleneck.weight" in capsys.readouterr().err
    report = convert_official(extra, tmp_path / "b.safetensors", TINY, ignore_unmapped=True)
    assert report["unmapped_dropped"] == ["bottleneck.weight"]
    assert {"pos_embed_image", "ImageExtract.model.fc.weight", "ImageExtract.model.blocks.2.attn.qkv.weight",
            "TextExtract.text_embed.pooler.dense.weight"} <= set(report["ignored"])
    missing = tmp_path / "missing.pth.tar"
    torch.save({"network": {k: v for k, v in net.items() if k != "mask.0.bias"}, "W": W}, missing)
    with pytest.raises(WeightsError, match="dga.gate.proj.bias"):
        convert_official(missing, tmp_path / "c.safetensors", TINY)
    # a bare network state dict converts too, without classifiers
    bare = tmp_path / "bare.pth.tar"
    torch.save(net, bare)
    assert convert_official(bare, tmp_path / "d.safetensors", TINY)["num_classes"] == 0


def test_pickled_objects_and_non_checkpoints_are_refused(source, tmp_path):
    _, net, W, _ = source
    evil = tmp_path / "evil.pth.tar"
    torch.save({"network": net, "W": W, "extra": NotATensor()}, evil)
    with pytest.raises(WeightsError, match="weights_only"):
        convert_official(evil, tmp_path / "e.safetensors", TINY)
    junk = tmp_path / "junk.pth.tar"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="junk.pth.tar"):
        convert_official(junk, tmp_path / "f.safetensors", TINY)


def test_numpy_1_pickles_of_the_official_scalar_load(tmp_path):
    """A 2022 checkpoint names numpy 1's module (numpy.core.multiarray.scalar), in either format."""
    path = tmp_path / "legacy.pth.tar"
    torch.save({"network": {"dict_feature": torch.ones(1, 2, 3)}, "test_best": np.float64(0.5) + 0.1, "epoch": 2},
               path, _use_new_zipfile_serialization=False)
    raw = path.read_bytes()
    path.write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    assert b"numpy.core.multiarray" in path.read_bytes()
    network, classifiers, extra = read_official_checkpoint(path)
    assert torch.equal(network["dict_feature"], torch.ones(1, 2, 3)) and classifiers is None
    assert extra == {"test_best": 0.6, "epoch": 2} and type(extra["test_best"]) is float
