"""Sample data and tiny models that several test folders share (importable: tests/ is on sys.path)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from adapter_service.training.trainer import Example

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Chameleons change colour to match the batch they are served in.",
    "Adapters are generated per cluster of requests by a small hyper-network.",
    "Café, naïve, 東京 and the lizard 🦎 are several bytes each.",
    "Serving many requests at once is called batching; one worker runs the model.",
]
PROMPTS = [
    "The quick brown fox",
    "Chameleons",
    "Adapters are generated per cluster of requests by a small",
    "Café 東京",
    "Serving many requests at once is called batching; one worker",
    "lazy dog",
    "🦎 the lizard",
    "match the batch they are",
]


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=360,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SENTENCES, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def tiny_model(tokenizer, seed: int = 0, max_positions: int = 128):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=max_positions,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    return LlamaForCausalLM(config).eval()


P, C = 6, 8
DOMAINS = [(10, 40), (100, 130), (200, 230)]


def synthetic(n: int, seed: int) -> list[Example]:
    """Three domains: prompt tokens from the domain's range; the continuation repeats a domain-specific
    cycle, so a domain-aware adapter can predict it much better than the random base model."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        d = i % 3
        lo, hi = DOMAINS[d]
        prompt = tuple(rng.randrange(lo, hi) for _ in range(P))
        continuation = tuple(lo + (j * (d + 2)) % 7 for j in range(C))
        out.append(Example(prompt, continuation, f"d{d}", f"doc{i}"))
    return out


def labelled_study(root: Path, documents: int = 60) -> tuple[Path, Path]:
    """A tiny model directory (with its tokenizer) and a labelled jsonl of three topics, for the
    `chameleon train`/`eval` commands: (model_dir, data)."""
    tokenizer = tiny_tokenizer()
    model_dir = root / "model"
    tiny_model(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    rng = random.Random(0)
    with open(root / "data.jsonl", "w") as f:
        for i in range(documents):
            label = i % 3
            words = " ".join(rng.choice(SENTENCES[label].split()) for _ in range(60))
            f.write(json.dumps({"text": words, "label": f"topic{label}"}) + "\n")
    return model_dir, root / "data.jsonl"


def start_sidecars(artifact, n: int, audit_dir, extra_args=()) -> list:
    """`n` real `chameleon serve` processes on `artifact`, started in parallel, each appending its audit
    log to `audit_dir/replica-{i}.jsonl` (what each answered, even after a SIGKILL: lines are flushed)."""
    from concurrent.futures import ThreadPoolExecutor

    from adapter_service.demo.sidecar import SidecarProcess

    def one(i: int) -> SidecarProcess:
        audit = ["--audit-log", str(audit_dir / f"replica-{i}.jsonl")]
        return SidecarProcess(artifact, extra_args=[*audit, *extra_args])

    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(one, i) for i in range(n)]
    started = [f.result() for f in futures if f.exception() is None]
    if len(started) < n:
        for sidecar in started:
            sidecar.stop()
        raise next(f.exception() for f in futures if f.exception() is not None)
    return started


def audit_records(audit_dir, i: int) -> list[dict]:
    """The audit records of replica `i` of start_sidecars, with `t`: the record's time in epoch seconds."""
    import datetime
    import json

    path = audit_dir / f"replica-{i}.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for record in records:
        when = datetime.datetime.strptime(record["time"], "%Y-%m-%dT%H:%M:%S.%fZ")
        record["t"] = when.replace(tzinfo=datetime.UTC).timestamp()
    return records
