"""Shared fixtures: tiny real models built from configs, real artifacts, a real server on loopback."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from adapter_service.serving.server import AdapterServer, ServerConfig
from adapter_service.serving.validation import Limits
from adapter_service.training.export import make_fresh_artifact

# The shape every tiny decoder shares unless its builder says otherwise.
TINY_DECODER = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
    "max_position_embeddings": 128,
}


def _tiny(config_class, model_class, seed: int, **settings) -> torch.nn.Module:
    torch.manual_seed(seed)
    return model_class(config_class(**{**TINY_DECODER, **settings})).eval()


def tiny_llama(seed: int = 0, **overrides) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return _tiny(LlamaConfig, LlamaForCausalLM, seed, **overrides)


def tiny_gpt2(seed: int = 0) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_embd=48, n_layer=2, n_head=4, vocab_size=256, n_positions=128)
    return GPT2LMHeadModel(config).eval()


def tiny_qwen2(seed: int = 0, **overrides) -> torch.nn.Module:
    """Qwen2: grouped-query attention (1 key-value head for 4 query heads) and biased q/k/v."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return _tiny(Qwen2Config, Qwen2ForCausalLM, seed, **{"num_key_value_heads": 1, **overrides})


def tiny_gemma2(seed: int = 0, **overrides) -> torch.nn.Module:
    """Gemma 2: tied input and output embeddings (scaled by sqrt(hidden)), sliding-window layers,
    soft-capped logits and a head_dim that is not hidden / heads."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    gemma = {"head_dim": 32, "sliding_window": 8, "tie_word_embeddings": True}
    return _tiny(Gemma2Config, Gemma2ForCausalLM, seed, **{**gemma, **overrides})


GGUF_TEXT = ["the cat sat on the mat", "a dog ran far away and then slept", "hello world"]


def write_tiny_gguf(
    path: Path,
    *,
    add_bos_token: bool | None,
    add_eos_token: bool | None = None,
    tokenizer_pre: str = "default",
    seed: int = 0,
) -> torch.nn.Module:
    """Write a tiny Llama as a float32 GGUF, as llama.cpp's converter would (q/k rows permuted, the
    tokenizer as a byte-level BPE vocabulary with merges, "gpt2" in GGUF terms, <unk> <s> </s> first);
    return the model written. add_*_token None leaves that metadata key out."""
    import gguf
    import numpy as np
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    specials = ["<unk>", "<s>", "</s>"]
    bpe.train_from_iterator(GGUF_TEXT, vocab_size=300, special_tokens=specials, show_progress=False)
    state = json.loads(bpe._tokenizer.to_str())["model"]
    tokens = [token for token, _ in sorted(state["vocab"].items(), key=lambda item: item[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["merges"]]
    model = tiny_llama(seed, vocab_size=len(tokens), bos_token_id=1, eos_token_id=2)
    config = model.config

    def permute(weight: np.ndarray, heads: int) -> np.ndarray:  # llama.cpp's rotary layout of q and k
        return (
            weight.reshape(heads, 2, weight.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)
        )

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tokenizer_pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(specials) + [1] * (len(tokens) - len(specials)))  # 3: control
    writer.add_token_merges(merges)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    if add_bos_token is not None:
        writer.add_add_bos_token(add_bos_token)
    if add_eos_token is not None:
        writer.add_add_eos_token(add_eos_token)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        weight = tensor.numpy()
        if name.endswith("q_proj.weight"):
            weight = permute(weight, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            weight = permute(weight, config.num_key_value_heads)
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        writer.add_tensor(target, np.ascontiguousarray(weight, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


def word_tokenizer(vocab_size: int = 256):
    """A real fast tokenizer for the tiny models: token i is the word `w{i}` (decode joins by spaces),
    so served prompt ids turn back into text as a real model's tokenizer would."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend)


@pytest.fixture(scope="session")
def encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT sentence encoder saved with its own tokenizer (words `w0`..`w255`), width 32."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-encoder")
    vocab = {"[PAD]": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(256)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(
        path
    )
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=160,
    )
    BertModel(config).eval().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def artifact_dir(tmp_path_factory: pytest.TempPathFactory, llama_dir: Path) -> Path:
    """Random-init (non-zero B) artifact for q_proj and v_proj of the tiny Llama, rank 4."""
    out = tmp_path_factory.mktemp("artifact")
    make_fresh_artifact(llama_dir, ["q_proj", "v_proj"], 4, out, init="random", seed=1)
    return out


class ServerThread:
    """A real AdapterServer on its own event loop in a background thread."""

    def __init__(self, config: ServerConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self.server = AdapterServer(config)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.address = asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(30)

    def stop(self, grace: float = 0.5) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(grace), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def forbid_gguf_conversion(monkeypatch: pytest.MonkeyPatch) -> None:
    """From here on a GGUF load fails unless it reads the converted safetensors cache."""
    from adapter_service.models import loading

    def no_conversion(path):
        raise AssertionError("the second load must read the safetensors cache")

    monkeypatch.setattr(loading, "_read_gguf", no_conversion)


def start_server(artifact: Path, **overrides) -> ServerThread:
    config = ServerConfig(artifact=artifact, address="127.0.0.1:0", metrics_port=0, **overrides)
    return ServerThread(config)


@pytest.fixture(scope="module")
def server(artifact_dir: Path) -> Iterator[ServerThread]:
    running = start_server(
        artifact_dir, limits=Limits(max_rows=256, max_clusters=8, max_message_bytes=8 << 20)
    )
    yield running
    running.stop()
