"""STAND-IN, not TGI (see text_generation_server/__init__.py): `models/globals.py`.

The global ADAPTER_TO_INDEX with set_adapter_to_index / get_adapter_to_index, and CUDA_GRAPHS and
PREFIX_CACHING parsed from the environment at import (TGI requires PREFIX_CACHING to be set; the stand-in
defaults it to "0").
"""

from __future__ import annotations

import os

PREFIX_CACHING = os.environ.get("PREFIX_CACHING", "0").lower() in {"1", "true"}

_graphs = os.getenv("CUDA_GRAPHS")
CUDA_GRAPHS = sorted((int(x) for x in _graphs.split(",")), reverse=True) if _graphs is not None else None

ADAPTER_TO_INDEX: dict[str, int] | None = None


def set_adapter_to_index(adapter_to_index: dict[str, int]) -> None:
    global ADAPTER_TO_INDEX
    ADAPTER_TO_INDEX = adapter_to_index


def get_adapter_to_index() -> dict[str, int] | None:
    return ADAPTER_TO_INDEX
