"""Any transformers causal LM, end to end with its default targets.

Four tiny architectures: Llama, Qwen2 (grouped-query attention, biased projections), Gemma 2 (tied
embeddings, a head_dim of its own) and GPT-2 (a fused Conv1D `c_attn`). For each: `default_targets`
picks the early layers' attention projections, `chameleon train` makes an artifact on them, a real
sidecar serves it, and `chameleon_torch` gives every prompt of a batch (one cluster each) the logits
and the greedy continuation that PEFT gives with the adapter `chameleon export-peft` writes for it.
"""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import conftest
from adapter_service import cli
from adapter_service.client import AdapterClient
from adapter_service.core.artifact import load_artifact
from adapter_service.core.clustering import PerRequest
from adapter_service.demo.sidecar import SidecarProcess
from adapter_service.models.loading import load_causal_lm
from adapter_service.models.spec import default_layer_count, default_targets, find_targets
from chameleon_torch import PluginConfig, attach

ARCHITECTURES: dict[str, Callable[[], torch.nn.Module]] = {
    "llama": conftest.tiny_llama,
    "qwen2": conftest.tiny_qwen2,
    "gemma2": conftest.tiny_gemma2,
    "gpt2": conftest.tiny_gpt2,
}
QV = ["self_attn.q_proj", "self_attn.v_proj"]
# Two decoder layers each, so the default adapts layer 0 (default_layer_count(2) == 1).
EXPECTED_TARGETS = {
    "llama": [f"model.layers.0.{m}" for m in QV],
    "qwen2": [f"model.layers.0.{m}" for m in QV],
    "gemma2": [f"model.layers.0.{m}" for m in QV],
    "gpt2": ["transformer.h.0.attn.c_attn"],
}
LABELS = 3
TRAIN_ARGS = [
    *("--steps", "3", "--eval-every", "1", "--batch-size", "4", "--lr", "0.05"),
    *("--rank", "2", "--bases", "2", "--hidden", "8"),
    *("--prompt-tokens", "8", "--continuation-tokens", "8"),
]
# What makes each architecture worth its own run; checked, so a builder cannot lose it unnoticed.
FEATURE = {
    "llama": lambda m: m.config.num_key_value_heads < m.config.num_attention_heads,
    "qwen2": lambda m: (
        m.config.num_key_value_heads == 1
        and m.get_submodule("model.layers.0.self_attn.q_proj").bias is not None
    ),
    "gemma2": lambda m: m.get_output_embeddings().weight is m.get_input_embeddings().weight,
    "gpt2": lambda m: type(m.get_submodule("transformer.h.0.attn.c_attn")).__name__ == "Conv1D",
}
NEW_TOKENS = 4
TOLERANCE = 1e-5  # normwise relative, fp32 end to end (float32 on the wire)


def byte_tokenizer():
    """One token per byte: a byte-level BPE without merges, over the 255 bytes UTF-8 text can hold (never
    0xff), and `<|endoftext|>` as eos and pad; 256 tokens, the tiny models' vocabulary. Any tokenizer
    class transformers picks for these model types cuts text the same way with it (Qwen2's rebuilds its
    own pre-tokenizer from the vocabulary, which a word-level tokenizer does not survive)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(set(pre_tokenizers.ByteLevel.alphabet()) - {"\u00ff"})  # byte 0xff's character
    vocab = {**{c: i for i, c in enumerate(alphabet)}, "<|endoftext|>": len(alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


def save_model_dir(model: torch.nn.Module, path: Path) -> Path:
    """The model and `byte_tokenizer()`, as a local HF directory."""
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def letters(label: int) -> str:
    """Each label writes with its own eight letters, so its documents' statistics stand apart."""
    return "abcdefghijklmnopqrstuvwx"[8 * label : 8 * label + 8]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A labelled jsonl corpus of made-up words, 200+ characters each (shorter ones are dropped)."""
    path = tmp_path_factory.mktemp("any-model-data") / "data.jsonl"
    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(48):
            alphabet = letters(i % LABELS)
            words = ("".join(rng.choices(alphabet, k=rng.randint(2, 6))) for _ in range(60))
            f.write(json.dumps({"text": " ".join(words), "label": f"topic{i % LABELS}"}) + "\n")
    return path


def prompts() -> list[str]:
    """One prompt per label, all as long (no padding: a cluster's statistic is its prompt's alone)."""
    return [f"{letters(label)[:3]} {letters(label)[3:7]}" for label in range(LABELS)]


def train(model_dir: Path, data: Path, out: Path, targets: list[str] | None) -> None:
    chosen = ["--targets", ",".join(targets)] if targets is not None else []
    command = ["train", "--model", str(model_dir), "--data", str(data), *chosen, *TRAIN_ARGS]
    assert cli.main([*command, "--out", str(out)]) == 0


def assert_plugin_matches_peft(model_dir: Path, artifact: Path, texts: list[str], tmp_path: Path) -> None:
    """Serve `artifact` from a real sidecar, adapt one batch of `texts` (one cluster per prompt) with
    chameleon_torch, and check each row's logits and greedy continuation against PEFT with the adapter
    `chameleon export-peft` writes for that prompt alone."""
    from peft import PeftModel

    base, tokenizer = load_causal_lm(model_dir)
    ids = torch.tensor(tokenizer(texts, add_special_tokens=False).input_ids)
    greedy = {"max_new_tokens": NEW_TOKENS, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    model = copy.deepcopy(base)
    with SidecarProcess(artifact) as sidecar:
        handle = attach(
            model,
            AdapterClient(sidecar.address, timeout=10),
            PluginConfig(policy=PerRequest(), wire_dtype="float32", deadline_s=10),
        )
        with torch.no_grad(), handle.adapt(ids) as batch:
            served = model(input_ids=ids).logits
            served_tokens = model.generate(ids, attention_mask=torch.ones_like(ids), **greedy)
        handle.detach()
    # One cluster per prompt; the service may answer two with one adapter (a mixture routed by predicted
    # label gives every prompt of a label the same one), which is why each row is checked on its own.
    assert batch.adapted and len(batch.assignments) == len(texts), batch

    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    changed = 0.0
    for row, text in enumerate(texts):
        prompt_file = tmp_path / f"prompt{row}.txt"
        prompt_file.write_text(text + "\n")
        out = tmp_path / f"peft{row}"
        peft_args = ["--artifact", str(artifact), "--model", str(model_dir), "--prompts", str(prompt_file)]
        assert cli.main(["export-peft", *peft_args, "--out", str(out)]) == 0
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
        one = ids[row : row + 1]
        with torch.no_grad():
            via_peft = peft_model(input_ids=one).logits[0]
            peft_tokens = peft_model.generate(input_ids=one, attention_mask=torch.ones_like(one), **greedy)
        error = float((via_peft - served[row]).abs().max() / served[row].abs().max())
        assert error <= TOLERANCE, f"row {row}: plugin and PEFT differ by {error:.2e}"
        assert torch.equal(peft_tokens[0], served_tokens[row]), row
        delta = float((via_peft - base_logits[row]).abs().max() / base_logits[row].abs().max())
        changed = max(changed, delta)
    assert changed > 1e-2, f"the adapters barely change the logits ({changed:.1e}): a vacuous check"


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_default_targets_train_serve_and_match_peft(arch: str, data: Path, tmp_path: Path) -> None:
    model = ARCHITECTURES[arch]()
    assert FEATURE[arch](model)
    targets = default_targets(model)
    found = find_targets(model, targets)
    assert [t.name for t in found] == EXPECTED_TARGETS[arch]
    assert default_layer_count(model.config.num_hidden_layers) == 1

    model_dir = save_model_dir(model, tmp_path / "model")
    artifact = tmp_path / "artifact"
    train(model_dir, data, artifact, targets)
    manifest = load_artifact(artifact).manifest
    assert [name for name, _, _ in manifest.targets] == EXPECTED_TARGETS[arch]
    assert manifest.hypernetwork["trained"] is True
    assert_plugin_matches_peft(model_dir, artifact, prompts(), tmp_path)


def test_train_without_targets_uses_the_models_default(data: Path, tmp_path: Path) -> None:
    """GPT-2 has none of the Llama names of the old default: only default_targets can make this work."""
    model = conftest.tiny_gpt2()
    model_dir = save_model_dir(model, tmp_path / "model")
    train(model_dir, data, tmp_path / "artifact", targets=None)
    manifest = load_artifact(tmp_path / "artifact").manifest
    assert [name for name, _, _ in manifest.targets] == EXPECTED_TARGETS["gpt2"]


# default_targets on models built on the meta device (shapes only; no weights, no training) -----------


def _meta(config) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _configs() -> dict[str, tuple[Callable[[], object], list[str]]]:
    import transformers as t

    small = {"hidden_size": 64, "num_attention_heads": 4, "vocab_size": 128}
    return {
        # SmolLM2's shape: exactly the study's recipe, the CLI's former default.
        "smollm2": (
            lambda: t.LlamaConfig(
                **{**small, "hidden_size": 576, "num_attention_heads": 9},
                num_hidden_layers=30,
                num_key_value_heads=3,
                intermediate_size=64,
            ),
            ["model.layers.[0-3].self_attn.q_proj", "model.layers.[0-3].self_attn.v_proj"],
        ),
        "qwen2-24": (
            lambda: t.Qwen2Config(**small, num_hidden_layers=24, num_key_value_heads=1, intermediate_size=64),
            ["model.layers.[0-3].self_attn.q_proj", "model.layers.[0-3].self_attn.v_proj"],
        ),
        "gpt2-12": (
            lambda: t.GPT2Config(n_layer=12, n_embd=64, n_head=4, vocab_size=128),
            ["transformer.h.[0-1].attn.c_attn"],
        ),
        "neox": (
            lambda: t.GPTNeoXConfig(**small, num_hidden_layers=6, intermediate_size=64),
            ["gpt_neox.layers.0.attention.query_key_value"],
        ),
        "phi3-32": (
            lambda: t.Phi3Config(**small, num_hidden_layers=32, intermediate_size=64, pad_token_id=0),
            ["model.layers.[0-4].self_attn.qkv_proj"],
        ),
        "opt": (
            lambda: t.OPTConfig(**small, num_hidden_layers=12, ffn_dim=64, word_embed_proj_dim=64),
            ["model.decoder.layers.[0-1].self_attn.q_proj", "model.decoder.layers.[0-1].self_attn.v_proj"],
        ),
        "llama-80": (  # more than ten layers: every module named, as a glob could not say 0-10
            lambda: t.LlamaConfig(**small, num_hidden_layers=80, intermediate_size=64),
            [f"model.layers.{i}.self_attn.{m}" for i in range(11) for m in ("q_proj", "v_proj")],
        ),
    }


@pytest.mark.parametrize("name", list(_configs()))
def test_default_targets_on_more_architectures(name: str) -> None:
    config, expected = _configs()[name]
    model = _meta(config())
    targets = default_targets(model)
    assert targets == expected
    found = find_targets(model, targets)
    layers = len({t.name.split(".")[-3] for t in found})
    assert layers == default_layer_count(model.config.num_hidden_layers)


def test_default_targets_says_what_to_pass_when_it_cannot_tell() -> None:
    from transformers import MambaConfig

    model = _meta(MambaConfig(num_hidden_layers=2, hidden_size=64, vocab_size=128))
    with pytest.raises(ValueError, match=r"--targets .*'in_proj', 'x_proj', 'dt_proj', 'out_proj'"):
        default_targets(model)


def test_default_layer_count_is_the_studys_share() -> None:
    assert [default_layer_count(n) for n in (1, 2, 8, 12, 24, 28, 30, 32, 80)] == [1, 1, 2, 2, 4, 4, 4, 5, 11]
