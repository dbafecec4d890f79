"""ONNX export of the two retrieval encoders, checked against PyTorch with onnxruntime.

    image_encoder.onnx   images (B, 3, H, W) normalised      -> embedding (B, D), L2-normalised
    text_encoder.onnx    input_ids, attention_mask (B, L)      -> embedding (B, D), L2-normalised
    tokenizer/           the HF tokenizer (same ids as training), export.json: image size, mean/std, fingerprint

Batch (and L for text) are dynamic. The training text path packs the BiLSTM input by caption length
(`pack_padded_sequence`, data-dependent, not exportable); export traces the model's own static-shape text
path instead (`TextEncoder.forward_static`, the same numbers). tests/test_search_export.py checks the
identity in PyTorch and the ONNX parity.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import onnxruntime as ort
import torch
from torch import nn

from lgur.checkpoint import load_model

TEXT_EXAMPLES = ["a man", "a woman wearing a red dress and white shoes",
                 "a young man with short black hair, a grey hooded jacket, blue jeans, black sneakers and a large "
                 "red backpack, walking while looking at his phone"]


class ExportableImage(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_images(images)


class ExportableText(nn.Module):
    """model.encode_texts on its static-shape text path (TextEncoder.forward_static: no packing, no
    data-dependent shapes), with (input_ids, attention_mask) as the traced inputs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode_texts(input_ids, attention_mask, static=True)


def example_inputs(model: nn.Module, image_size, batch: int = 2, seed: int = 0):
    """Random normalised images and tokenised example captions for tracing and parity checks."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, *image_size, generator=g)
    texts = [TEXT_EXAMPLES[(seed + i) % len(TEXT_EXAMPLES)] for i in range(batch)]  # lengths vary with seed
    tok = model.tokenizer(texts, padding=True, return_tensors="pt")
    return images, tok["input_ids"], tok["attention_mask"]


def _max_diff(a: torch.Tensor, b) -> float:
    return float((a - torch.as_tensor(b)).abs().max())


def export_onnx(checkpoint: str | Path, out: str | Path, opset: int = 17) -> str:
    """Export both encoders to `out`, then check them with onnxruntime at batch/length sizes other than
    the traced ones. Returns a report with the parity errors (max abs difference of the embeddings)."""
    model, cfg, meta = load_model(checkpoint)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    image_net, text_net = ExportableImage(model).eval(), ExportableText(model).eval()
    images, ids, mask = example_inputs(model, cfg.data.image_size)
    common = dict(opset_version=opset, dynamo=False, do_constant_folding=True)
    with torch.no_grad(), warnings.catch_warnings():
        # shape checks traced as constants and the exporter's LSTM batch-size caution: the parity check below
        # runs other batch sizes and lengths, so these warnings are verified rather than trusted
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*variable length with LSTM.*")
        # the TorchScript exporter on purpose: the torch.export one needs onnxscript (not a dependency) and
        # this path is verified by the parity check
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*",
                                category=DeprecationWarning)
        torch.onnx.export(image_net, (images,), str(out / "image_encoder.onnx"), input_names=["images"],
                          output_names=["embedding"],
                          dynamic_axes={"images": {0: "batch"}, "embedding": {0: "batch"}}, **common)
        torch.onnx.export(text_net, (ids, mask), str(out / "text_encoder.onnx"),
                          input_names=["input_ids", "attention_mask"], output_names=["embedding"],
                          dynamic_axes={"input_ids": {0: "batch", 1: "length"},
                                        "attention_mask": {0: "batch", 1: "length"}, "embedding": {0: "batch"}},
                          **common)
    model.tokenizer.save_pretrained(str(out / "tokenizer"))
    info = {"fingerprint": meta["fingerprint"], "image_size": list(cfg.data.image_size),
            "image_mean": list(model.image_mean), "image_std": list(model.image_std),
            "max_caption_tokens": cfg.data.max_caption_tokens, "embedding_dim": model.embedding_dim,
            "inputs": {"image_encoder": ["images"], "text_encoder": ["input_ids", "attention_mask"]}}

    # parity at shapes the trace did not see: batch 1 and 3, other caption lengths
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    img_sess = ort.InferenceSession(str(out / "image_encoder.onnx"), opts, providers=["CPUExecutionProvider"])
    txt_sess = ort.InferenceSession(str(out / "text_encoder.onnx"), opts, providers=["CPUExecutionProvider"])
    diffs = {"image": 0.0, "text": 0.0}
    for batch, seed in ((1, 1), (3, 2)):
        images, ids, mask = example_inputs(model, cfg.data.image_size, batch=batch, seed=seed)
        with torch.no_grad():
            ref_img, ref_txt = model.encode_images(images), model.encode_texts(ids, mask)
        onnx_txt = txt_sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        diffs["image"] = max(diffs["image"], _max_diff(ref_img, img_sess.run(None, {"images": images.numpy()})[0]))
        diffs["text"] = max(diffs["text"], _max_diff(ref_txt, onnx_txt))
    info["parity_max_abs_diff"] = diffs
    (out / "export.json").write_text(json.dumps(info, indent=1))
    d = info["parity_max_abs_diff"]
    return (f"wrote {out}/image_encoder.onnx, text_encoder.onnx, tokenizer/, export.json\n"
            f"onnxruntime vs PyTorch, max abs difference of the embeddings: image {d['image']:.2e}, "
            f"text {d['text']:.2e}")
