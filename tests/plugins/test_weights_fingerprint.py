"""A model served in half precision matches an artifact made from the same float32 weights; other
weights are still refused, and so is half precision against an artifact without per-dtype hashes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from adapter_service.client import AdapterClient
from chameleon_torch import ManifestMismatch, check_model
from conftest import ServerThread, tiny_llama


@pytest.fixture(scope="module")
def manifest(server: ServerThread):
    with AdapterClient(server.address, timeout=30) as client:
        return client.manifest()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_same_weights_in_any_dtype_match(manifest, dtype: torch.dtype) -> None:
    check_model(tiny_llama().to(dtype), manifest)  # the artifact fixture was made from tiny_llama()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_other_weights_are_refused_in_any_dtype(manifest, dtype: torch.dtype) -> None:
    with pytest.raises(
        ManifestMismatch, match=f"the {str(dtype)[6:]} embeddings hash to .* different weights"
    ):
        check_model(tiny_llama(seed=1).to(dtype), manifest)


def test_half_precision_against_an_old_artifact_says_what_to_do(manifest) -> None:
    old = dataclasses.replace(
        manifest, base_model=dataclasses.replace(manifest.base_model, weights_sha256_by_dtype={})
    )
    check_model(tiny_llama(), old)  # float32 still matches exactly
    with pytest.raises(ManifestMismatch, match="predates half-precision fingerprints: re-export it"):
        check_model(tiny_llama().to(torch.bfloat16), old)
    check_model(tiny_llama().to(torch.bfloat16), old, check_weights=False)  # the documented way out
