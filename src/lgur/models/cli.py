"""`lgur` subcommands of the models area. Each subcommand registers itself from add_parsers()."""
from __future__ import annotations

import argparse


def add_convert_official(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert-official",
                       help="convert an official LGUR checkpoint (best.pth.tar) to an lgur model file",
                       description="Map the official LGUR state-dict names (network + ID classifiers W) onto "
                                   "lgur's and write a self-contained .safetensors model file. The official file "
                                   "is read with torch.load(weights_only=True).")
    p.add_argument("checkpoint", help="official checkpoint, e.g. checkpoints/.../best.pth.tar")
    p.add_argument("output", help="lgur model file to write (.safetensors)")
    p.add_argument("--config", default=None,
                   help="recipe for what the weights cannot tell (backbones, image size, head counts); "
                        "default: the built-in defaults, which are the official model")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, repeatable (e.g. --set model.recon_heads=6)")
    p.add_argument("--ignore-unmapped", action="store_true",
                   help="drop official keys that map to nothing (listed as warnings) instead of refusing")
    p.set_defaults(func=_run_convert_official)


def _run_convert_official(args: argparse.Namespace) -> int:
    from lgur.models.convert import convert_official

    report = convert_official(args.checkpoint, args.output, args.config, tuple(args.overrides),
                              args.ignore_unmapped)
    print(f"wrote {report['output']}: {report['tensors']} tensors, {report['num_classes']} ID classes, "
          f"fingerprint {report['fingerprint']}")
    if report["ignored"]:
        print(f"dropped {len(report['ignored'])} official tensors that no forward reads:")
        for name in report["ignored"]:
            print(f"  {name}")
    if report["unmapped_dropped"]:
        print(f"WARNING: dropped {len(report['unmapped_dropped'])} unmapped official keys: "
              f"{', '.join(report['unmapped_dropped'])}")
    return 0


def add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="parameter counts of the model a config describes (total, trainable, per module)",
                       description="Build the model with random init on the meta device (no weights needed) and "
                                   "print its parameter counts per paper module; the ID classifiers separately.")
    p.add_argument("--config", default=None, help="recipe (path or name, e.g. lgur_cuhk); default: built-in defaults")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, repeatable (e.g. --set model.image_backbone=resnet50)")
    p.add_argument("--num-classes", type=int, default=0,
                   help="ID classes to count classifiers for (CUHK-PEDES 11000 after the official skip, "
                        "ICFG-PEDES 3102, RSTPReid 3701); default 0: none")
    p.add_argument("--json", action="store_true", help="print {total, trainable, classifiers, modules, ...} as JSON")
    p.set_defaults(func=_run_info)


def _run_info(args: argparse.Namespace) -> int:
    from lgur.models.info import run_info

    return run_info(args)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    add_convert_official(sub)
    add_info(sub)
