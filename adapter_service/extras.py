"""One clear line when a part of Chameleon is imported without the extra that installs its packages.

The base install (numpy, grpcio, protobuf) carries the wire format and the client; every other role is an
extra, so the sidecar's host never pays for torch. Each role's package calls `require` first thing.
"""

from __future__ import annotations

import importlib.util

DISTRIBUTION = "chameleon-adapters"


class MissingExtra(ModuleNotFoundError):
    """A role's packages are not installed; the message names the extra that installs them."""


def require(part: str, extra: str, *modules: str) -> None:
    """Raise `MissingExtra` naming `extra` unless every one of `modules` can be imported."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtra(
            f"{part} needs {', '.join(missing)}, which is not installed: "
            f"pip install '{DISTRIBUTION}[{extra}]'",
            name=missing[0],
        )
