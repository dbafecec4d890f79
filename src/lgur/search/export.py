"""ONNX export moved to its own area, lgur.export (lgur/export/onnx.py); these names stay importable here."""
from __future__ import annotations

from lgur.export.onnx import (TEXT_EXAMPLES, ExportableImage, ExportableText, example_inputs,  # noqa: F401
                              export_onnx)

__all__ = ["TEXT_EXAMPLES", "ExportableImage", "ExportableText", "example_inputs", "export_onnx"]
