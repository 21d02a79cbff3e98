"""Shared fixtures: tiny real models built from configs, real artifacts, a real server on loopback."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from adapter_service.serving.server import AdapterServer, ServerConfig
from adapter_service.serving.validation import Limits
from adapter_service.training.export import make_fresh_artifact


def tiny_llama(seed: int = 0, **overrides) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    shape = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 256,
        "max_position_embeddings": 128,
    }
    config = LlamaConfig(**{**shape, **overrides})
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_embd=48, n_layer=2, n_head=4, vocab_size=256, n_positions=128)
    return GPT2LMHeadModel(config).eval()


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
