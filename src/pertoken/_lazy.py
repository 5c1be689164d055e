"""Lazy package exports (PEP 562): a package names what it exports and where it lives, and the
defining module is imported on first use, so that importing the CLI stays light."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[list[str], Callable]:
    """``(__all__, __getattr__)`` for ``package``, given ``{name: module}``."""

    def __getattr__(name: str):
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return sorted(exports), __getattr__
