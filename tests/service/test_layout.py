"""Imports flow one way between the roles, so each extra installs what its role imports and no more:

    core  <-  client  <-  plugins (chameleon_torch, chameleon_tgi, chameleon_vllm)  <-  example server
      ^        ^            |
      |        |            v
      +--- serving     models (torch)  <-  training  <-  demo  <-  cli
                                            |
                                            +-> serving.runtime (the export's ONNX parity check)

Checked on the source (every import statement, lazy ones inside functions included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# package -> the first-party packages its modules may import (its own is always allowed)
ALLOWED = {
    "adapter_service.core": {"adapter_service.proto", "adapter_service.extras"},
    "adapter_service.client": {"adapter_service.core", "adapter_service.proto", "adapter_service.extras"},
    "adapter_service.serving": {"adapter_service.core", "adapter_service.proto", "adapter_service.extras"},
    "adapter_service.models": {"adapter_service.core", "adapter_service.extras"},
    "adapter_service.data": set(),
    "adapter_service.training": {
        "adapter_service", "adapter_service.core", "adapter_service.models", "adapter_service.data",
        "adapter_service.extras", "adapter_service.serving.runtime",
    },
    "adapter_service.demo": {
        "adapter_service.core", "adapter_service.client", "adapter_service.models",
        "adapter_service.training", "adapter_service.data",
    },
    "chameleon_torch": {"adapter_service.core", "adapter_service.client", "adapter_service.models",
                        "adapter_service.extras"},
    "chameleon_tgi": {"adapter_service.core", "adapter_service.client", "adapter_service.models",
                      "chameleon_torch"},
    "chameleon_vllm": {"adapter_service.core", "adapter_service.client", "adapter_service.models",
                       "chameleon_torch"},
    "chameleon_model_server": {"adapter_service.core", "adapter_service.client", "adapter_service.models",
                               "adapter_service.extras", "chameleon_torch"},
}  # fmt: skip
FIRST_PARTY = (
    "adapter_service",
    "chameleon_torch",
    "chameleon_tgi",
    "chameleon_vllm",
    "chameleon_model_server",
)
SOURCES = {
    "chameleon_torch": ROOT / "plugins" / "chameleon_torch",
    "chameleon_tgi": ROOT / "plugins" / "chameleon_tgi",
    "chameleon_vllm": ROOT / "plugins" / "chameleon_vllm",
    "chameleon_model_server": ROOT / "examples" / "model_server",
}


def _folder(package: str) -> Path:
    return SOURCES.get(package) or ROOT.joinpath(*package.split("."))


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {n for n in names if n.split(".")[0] in FIRST_PARTY}


def _allowed(name: str, package: str) -> bool:
    if name == package or name.startswith(package + "."):
        return True
    # `from adapter_service.core import codec` names both the package and the module
    return any(name == ok or name.startswith(ok + ".") for ok in ALLOWED[package])


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_flow_one_way(package: str) -> None:
    wrong = {
        f"{path.relative_to(ROOT)}: {name}"
        for path in sorted(_folder(package).rglob("*.py"))
        if "proto" not in path.parts[-2:-1]
        for name in _imports(path)
        if not _allowed(name, package) and name != "adapter_service"
    }
    assert not wrong, f"{package} may import only {sorted(ALLOWED[package])}; found:\n" + "\n".join(
        sorted(wrong)
    )


def test_the_service_never_imports_a_plugin_or_the_torch_side() -> None:
    found = {
        f"{path.relative_to(ROOT)}: {name}"
        for path in (ROOT / "adapter_service" / "serving").rglob("*.py")
        for name in _imports(path)
        if not name.startswith(("adapter_service.core", "adapter_service.proto", "adapter_service.serving",
                                "adapter_service.extras"))
    }  # fmt: skip
    assert not found
