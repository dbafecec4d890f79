"""The `lgur` command. Each area registers its own subcommands (lazy imports keep `lgur -h` fast)."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# module that defines `add_parsers(subparsers)` for each group of subcommands
_AREAS = ["lgur.data.cli", "lgur.models.cli", "lgur.engine.cli", "lgur.search.cli", "lgur.video.cli", "lgur.demo"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lgur", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _AREAS:
        importlib.import_module(name).add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. Errors are one readable line (exit 2 for the user's input, 1 for a bug in lgur);
    `LGUR_DEBUG=1` shows the full traceback instead."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if os.environ.get("LGUR_DEBUG", "") not in ("", "0"):
            raise
        from lgur.errors import LgurError

        if isinstance(e, (LgurError, OSError)):  # the user's input, files or machine: say what and where
            print(f"lgur {args.command}: error: {e}", file=sys.stderr)
            return 2
        print(f"lgur {args.command}: internal error ({type(e).__name__}): {e}\n"
              f"  run again with LGUR_DEBUG=1 for the traceback, and please report it", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
