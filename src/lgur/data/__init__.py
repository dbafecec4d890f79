"""Data: annotation readers (CUHK-PEDES, ICFG-PEDES, RSTPReid), the synthetic dataset, torch datasets,
transforms, the decoded-image cache and on-device augmentation.

The readers import no torch (so `lgur data-check` and `lgur -h` stay fast); the torch parts are loaded
on first use of their names.
"""
from __future__ import annotations

import importlib

from lgur.data.annotations import Annotations, Problem, Problems, Record, load_annotations

_LAZY = {
    "build_loaders": "datasets", "DataLoaders": "datasets", "EvalSplit": "datasets", "TrainPairs": "datasets",
    "EvalImages": "datasets", "EvalCaptions": "datasets", "ImageFolderSet": "datasets", "Collate": "datasets",
    "ImageCache": "datasets", "DeviceAugment": "transforms", "build_train_transform": "transforms",
    "build_test_transform": "transforms", "generate_synthetic": "synth",
}

__all__ = ["Annotations", "Problem", "Problems", "Record", "load_annotations", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'lgur.data' has no attribute '{name}'")
    module = importlib.import_module(f"lgur.data.{_LAZY[name]}")
    return getattr(module, "generate" if name == "generate_synthetic" else name)
