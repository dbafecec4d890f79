"""ONNX export: the unpacked text path equals the packed one, and onnxruntime matches PyTorch."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lgur.search.export import ExportableText, example_inputs

pytest.importorskip("onnxruntime")


def test_unpacked_text_path_equals_packed(tiny_checkpoint):
    from lgur.checkpoint import load_model

    model, cfg, _ = load_model(tiny_checkpoint)
    net = ExportableText(model).eval()
    _, ids, mask = example_inputs(model, cfg.data.image_size, batch=5, seed=0)
    assert mask.sum(1).unique().numel() >= 3  # captions of different lengths: padding really varies
    # extra trailing padding columns must not change anything either
    ids_pad = torch.cat([ids, torch.zeros(5, 7, dtype=ids.dtype)], 1)
    mask_pad = torch.cat([mask, torch.zeros(5, 7, dtype=mask.dtype)], 1)
    with torch.no_grad():
        ref = model.encode_texts(ids, mask)
        torch.testing.assert_close(net(ids, mask), ref, atol=1e-6, rtol=0)
        torch.testing.assert_close(net(ids_pad, mask_pad), ref, atol=1e-6, rtol=0)
        # the in-length reversal matters: a plain BiLSTM over the padded batch gives other numbers
        out = model.text.lstm(model.text.backbone(input_ids=ids, attention_mask=mask).last_hidden_state)[0]
        d = model.text.dim
        naive = (out[..., :d] + out[..., d:]) / 2 * mask[..., None]
        assert (naive - model.text(ids, mask)).abs().max() > 1e-4


def test_onnx_export_parity(tmp_path, tiny_checkpoint, capsys):
    import onnxruntime as ort

    from lgur.checkpoint import load_model
    from lgur.cli import main

    out = tmp_path / "onnx"
    assert main(["export", "--checkpoint", str(tiny_checkpoint), "--format", "onnx", "--out", str(out)]) == 0
    assert "max abs difference" in capsys.readouterr().out
    info = json.loads((out / "export.json").read_text())
    assert info["parity_max_abs_diff"]["image"] <= 1e-4 and info["parity_max_abs_diff"]["text"] <= 1e-4
    # independent check here, at other batch sizes and lengths than the export's own
    model, cfg, _ = load_model(tiny_checkpoint)
    img = ort.InferenceSession(str(out / "image_encoder.onnx"), providers=["CPUExecutionProvider"])
    txt = ort.InferenceSession(str(out / "text_encoder.onnx"), providers=["CPUExecutionProvider"])
    for batch, seed in ((4, 7), (1, 2)):
        images, ids, mask = example_inputs(model, cfg.data.image_size, batch=batch, seed=seed)
        with torch.no_grad():
            ref_img, ref_txt = model.encode_images(images).numpy(), model.encode_texts(ids, mask).numpy()
        got_img = img.run(None, {"images": images.numpy()})[0]
        got_txt = txt.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        assert got_img.shape == (batch, model.embedding_dim) and got_txt.shape == (batch, model.embedding_dim)
        assert np.abs(got_img - ref_img).max() <= 1e-4
        assert np.abs(got_txt - ref_txt).max() <= 1e-4
        np.testing.assert_allclose(np.linalg.norm(got_txt, axis=1), 1.0, atol=1e-5)
    # the saved tokenizer gives the same ids as the model's
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    assert tok(["a man in red"])["input_ids"] == model.tokenizer(["a man in red"])["input_ids"]
