"""STAND-IN, not TGI (see text_generation_server/__init__.py): `utils/kernels.py`.

`load_kernel` tries a local module of that name first, as TGI's does; here that is the stand-in
../punica_sgmv.py, and there is no Hub fallback.
"""

from __future__ import annotations

import importlib


def load_kernel(*, module: str, repo_id: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError:
        return None  # no Hub in the stand-in: behave as a machine without the kernel
