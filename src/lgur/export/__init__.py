"""Deployment export: the two retrieval encoders as ONNX files, checked against PyTorch with onnxruntime.

    lgur export --checkpoint model.safetensors --out exported/

    from lgur.export import export_onnx
    report = export_onnx("model.safetensors", "exported/")

Names resolve lazily so the `lgur` command's parser does not import torch.
"""
from __future__ import annotations

from lgur._lazy import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "export_onnx": "onnx", "ExportableImage": "onnx", "ExportableText": "onnx", "example_inputs": "onnx",
})
