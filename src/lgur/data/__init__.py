"""Data: annotation readers (CUHK-PEDES, ICFG-PEDES, RSTPReid), the synthetic dataset, torch datasets,
transforms, the decoded-image cache and on-device augmentation.

The readers import no torch (so `lgur data-check` and `lgur -h` stay fast); the torch parts are loaded
on first use of their names.
"""
from __future__ import annotations

from lgur._lazy import lazy_exports
from lgur.data.annotations import Annotations, Problem, Problems, Record, load_annotations

# name -> (module, attribute) of the torch-side API, imported on first use
_LAZY = {name: ("datasets", name) for name in ("build_loaders", "build_eval_split", "DataLoaders", "EvalSplit",
                                               "TrainPairs", "EvalImages", "EvalCaptions", "ImageFolderSet",
                                               "Collate", "ImageCache")}
_LAZY |= {name: ("transforms", name) for name in ("DeviceAugment", "build_train_transform", "build_test_transform")}
_LAZY |= {name: ("sampling", name) for name in ("EpochSampler", "SeededPairs", "resumable_loader")}
_LAZY["generate_synthetic"] = ("synth", "generate")
_LAZY["load_tokenizer"] = ("tokenizer", "load_tokenizer")

_lazy_names, __getattr__ = lazy_exports(__name__, _LAZY)
__all__ = ["Annotations", "Problem", "Problems", "Record", "load_annotations", *_lazy_names]
