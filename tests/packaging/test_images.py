"""The images build from the repository root: each Dockerfile that installs the project copies every
folder pyproject.toml takes packages from (docker cannot be run here; this is what can be checked)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted(ROOT.glob("deploy/*/Dockerfile"))


def _source_folders() -> set[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = {path.split("/")[0] for path in config["package-dir"].values()}
    return dirs | {p.split(".")[0] for p in config["packages"] if p not in config["package-dir"]}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_dockerfile_copies_every_source_folder(dockerfile: Path) -> None:
    sources = [line.split()[1:-1] for line in re.findall(r"^COPY .+$", dockerfile.read_text(), re.M)]
    copied = {source.split("/")[0] for line in sources for source in line}
    assert {"pyproject.toml", "README.md"} <= copied
    missing = _source_folders() - copied
    assert not missing, f"{dockerfile.relative_to(ROOT)} does not COPY {sorted(missing)}"


def test_there_are_images_to_check() -> None:
    assert {p.parent.name for p in DOCKERFILES} >= {"sidecar", "vllm", "tgi"}
