"""Model files (safetensors + config metadata): the public name of lgur.models.checkpoint.

The code lives beside the model builder it needs (lgur.models.checkpoint); this module keeps
`from lgur.checkpoint import load_model, save_model, ...` working for users and the other areas.
"""
from __future__ import annotations

from lgur.models.checkpoint import (FORMAT, IDENTITY_DATA_KEYS, LEGACY_FORMATS, NON_IDENTITY_MODEL_KEYS,  # noqa: F401
                                    atomic_write, identity_config, load_model, model_fingerprint, read_metadata,
                                    read_model_file, save_model, tensors_fingerprint)

__all__ = ["FORMAT", "IDENTITY_DATA_KEYS", "LEGACY_FORMATS", "NON_IDENTITY_MODEL_KEYS", "atomic_write",
           "identity_config", "load_model", "model_fingerprint", "read_metadata", "read_model_file", "save_model",
           "tensors_fingerprint"]
