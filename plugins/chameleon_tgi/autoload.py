"""Deferred start-up: a post-import hook on `text_generation_server.models`, and the PATH shim's main.

Standard library only, and nothing at all happens unless CHAMELEON_TGI=1: TGI reads ATTENTION and
PREFIX_CACHING at import and pulls in CUDA, so it must never be imported early
(TGI_INTERNALS.md, section 5). When TGI's cli imports `text_generation_server.models` (before `server.py`
binds get_model_with_lora_adapters by name), `chameleon_tgi.patch.install()` runs right after that module
executes: it checks the TGI version and the names it needs, then wraps them, or raises to stop start-up.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from collections.abc import Mapping
from types import ModuleType

ENABLE_VAR = "CHAMELEON_TGI"
TARGET = "text_generation_server.models"


def enabled(env: Mapping[str, str] | None = None) -> bool:
    """True only for CHAMELEON_TGI=1 (or true/yes): anything else leaves TGI untouched."""
    env = os.environ if env is None else env
    return env.get(ENABLE_VAR, "").strip().lower() in {"1", "true", "yes"}


class _Loader(importlib.abc.Loader):
    """Delegates to TGI's own loader, then applies the patches to the freshly executed module."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        _apply()


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: object, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != TARGET:
            return None
        remove_import_hook()  # once: the next finders locate TGI's real module
        for finder in sys.meta_path:
            spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader)
                return spec
        return None


_FINDER = _Finder()


def install_import_hook() -> bool:
    """Arrange for the patches to be applied when TGI imports its models; True if a hook was set.

    If TGI's models are already imported (in-process use), the patches are applied right away."""
    if TARGET in sys.modules:
        _apply()
        return False
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
    return True


def remove_import_hook() -> None:
    while _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)


def _apply() -> None:
    from chameleon_tgi.patch import install

    install()


def main() -> None:
    """The `text-generation-server` shim: hook (if enabled), then TGI's own cli with the same argv."""
    if enabled():
        install_import_hook()
    from text_generation_server.cli import app

    sys.exit(app())
