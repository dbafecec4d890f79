"""Lazy package exports: `lgur -h` and the readers must not pay for importing torch/timm/transformers."""
from __future__ import annotations

import importlib
from typing import Callable

# package -> its table, so tools (tests/test_import_graph.py) can see which module a lazy name comes from
TABLES: dict[str, dict[str, str | tuple[str, str]]] = {}


def lazy_exports(package: str, table: dict[str, str | tuple[str, str]]) -> tuple[list[str], Callable[[str], object]]:
    """(__all__, __getattr__) for `package`. table: public name -> submodule (relative to the package), or
    (submodule, attribute) when the attribute is named differently there."""
    TABLES[package] = dict(table)

    def __getattr__(name: str):
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, attr = table[name] if isinstance(table[name], tuple) else (table[name], name)
        return getattr(importlib.import_module(f"{package}.{module}"), attr)

    return sorted(table), __getattr__
