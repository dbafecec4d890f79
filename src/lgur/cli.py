"""The `lgur` command. Each area registers its own subcommands (lazy imports keep `lgur -h` fast)."""
from __future__ import annotations

import argparse
import importlib
import sys

# module that defines `add_parsers(subparsers)` for each group of subcommands
_AREAS = ["lgur.data.cli", "lgur.models.cli", "lgur.engine.cli", "lgur.search.cli", "lgur.demo"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lgur", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _AREAS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:  # an area not written yet
            if e.name == name:
                continue
            raise
        module.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # readable one-line error for user mistakes; full trace with LGUR_DEBUG=1
        from lgur.errors import LgurError

        if isinstance(e, LgurError):
            print(f"lgur {args.command}: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
