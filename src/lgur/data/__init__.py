"""Data: annotation readers (CUHK-PEDES, ICFG-PEDES, RSTPReid), the synthetic dataset, torch datasets,
transforms, the decoded-image cache and on-device augmentation.

Every name loads its module on first use, so the `lgur` command's parser (which imports lgur.data.cli,
and so this package) imports none of them; the readers (annotations) import no torch, the rest does.
"""
from __future__ import annotations

from lgur._lazy import lazy_exports

# name -> (module, attribute), imported on first use
_LAZY = {name: ("annotations", name) for name in ("Annotations", "Problem", "Problems", "Record", "load_annotations")}
_LAZY |= {name: ("datasets", name) for name in ("build_loaders", "build_eval_split", "DataLoaders", "EvalSplit",
                                               "TrainPairs", "EvalImages", "EvalCaptions", "ImageFolderSet",
                                               "Collate", "ImageCache")}
_LAZY |= {name: ("transforms", name) for name in ("DeviceAugment", "build_train_transform", "build_test_transform")}
_LAZY |= {name: ("sampling", name) for name in ("EpochSampler", "SeededPairs", "resumable_loader")}
_LAZY["generate_synthetic"] = ("synth", "generate")
_LAZY["load_tokenizer"] = ("tokenizer", "load_tokenizer")

_lazy_names, __getattr__ = lazy_exports(__name__, _LAZY)
__all__ = _lazy_names
