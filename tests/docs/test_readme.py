"""The README's commands, run as a user would run them.

Every ```bash block of README.md runs with bash (`set -euo pipefail` first) in a temporary directory
prepared so that the commands work with tiny models:

- `./my-model`: a tiny Llama (4 decoder layers, random weights) saved with `save_pretrained`, with a
  byte-level BPE tokenizer trained on `my.jsonl` and saved next to it;
- `my.jsonl`: 60 lines of three kinds of text (recipes, legal prose, Python), each with "text" and
  "label", long enough for the default prompt and continuation;
- `PATH` starts with the directory of `sys.executable` (the venv's `chameleon`, `python`); the hub is
  off (`HF_HUB_OFFLINE=1`).

Every ```python block runs as a script with `sys.executable` in the same directory. All blocks run in
README order, each in its own process group (a new session). What a block starts in the background
(`&`: the sidecar, the model server) keeps running for the blocks after it, as in a user's shell; every
group is killed when the test ends (SIGTERM, then SIGKILL), pass or fail. The blocks wait for their own
servers (the README's `timeout ... until curl ...` lines), so the test does not.

A block right after a line `<!-- docs-test: skip (REASON) -->` is not run. Only the quick start's two
scripts may be skipped: `scripts/demo.sh` (tests/demo/test_demo.py runs the demo) and `scripts/test.sh`
(CI runs it).

The commands are run as written, except for the substitutions in SUBSTITUTIONS, the only changes made:

- `chameleon train` gets `--steps 4 --eval-every 2`: the README's honest default (at most 150 steps)
  takes minutes even on a tiny model;
- the ports 50051, 9464 and 8080 become free ports picked here, so that a server already running on the
  machine cannot break the test (and the test cannot break it).

EXPECTED adds checks on what some blocks print (the model server answered and adapted its batch; the
plugin adapted the Python block's batch). The README must also stay at most 200 lines long, and its
relative links (and those of docs/) must name files that exist.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
MAX_README_LINES = 200
SKIP_MARKER = re.compile(r"^<!--\s*docs-test:\s*skip\s*\((?P<reason>[^)]+)\)\s*-->$")
# The commands the README may leave to other tests: its quick start.
SKIPPABLE = {"scripts/demo.sh", "scripts/test.sh"}
BLOCK_TIMEOUT_S = 600
# README text -> what the test runs instead (regular expressions; "{grpc}" etc. are the free ports).
SUBSTITUTIONS = [
    (r"\bchameleon train ", "chameleon train --steps 4 --eval-every 2 "),
    (r"\b50051\b", "{grpc}"),
    (r"\b9464\b", "{metrics}"),
    (r"\b8080\b", "{http}"),
]
# A block containing the key must print text matching every pattern.
EXPECTED = {
    "/generate": [r'"generated_text"', r'chameleon_plugin_batches_total\{outcome="adapted"\} [1-9]'],
    "handle.adapt(": [r"(?m)^True None \["],
}


@dataclass
class Block:
    language: str
    code: str
    line: int  # of the opening fence, 1-based
    skip: str | None  # the marker's reason


def readme_blocks(text: str) -> list[Block]:
    """The fenced blocks of a Markdown text, with the skip marker that precedes each (if any)."""
    blocks: list[Block] = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[index])
        if not fence:
            index += 1
            continue
        start = index
        end = start + 1
        while end < len(lines) and not lines[end].startswith("```"):
            end += 1
        previous = next((lines[i].strip() for i in range(start - 1, -1, -1) if lines[i].strip()), "")
        marker = SKIP_MARKER.match(previous)
        code = "\n".join(lines[start + 1 : end]) + "\n"
        blocks.append(Block(fence.group(1), code, start + 1, marker.group("reason") if marker else None))
        index = end + 1
    return blocks


def commands(code: str) -> list[str]:
    """A shell block's commands without comments and blank lines."""
    stripped = (re.sub(r"\s+#.*$", "", line).strip() for line in code.splitlines())
    return [line for line in stripped if line and not line.startswith("#")]


def substitute(code: str, ports: dict[str, int]) -> str:
    for pattern, replacement in SUBSTITUTIONS:
        code = re.sub(pattern, replacement.format(**ports), code)
    return code


# -- the workspace ------------------------------------------------------------------------------------

KINDS = {
    "recipe": [
        "Whisk two eggs with a cup of flour and a pinch of salt.",
        "Bake the loaf for forty minutes until the crust is golden.",
        "Simmer the onions in butter over a low heat until soft.",
        "Season the soup with black pepper and fresh thyme.",
        "Knead the dough for ten minutes, then let it rise in a warm place.",
        "Serve the stew hot with crusty bread and a green salad.",
    ],
    "legal": [
        "The court held that the contract was void for uncertainty.",
        "The appellant argued that the statute did not apply to the lease.",
        "Section 12 requires written notice within thirty days of the breach.",
        "The tenant shall pay the rent on the first day of each month.",
        "The judgment of the lower court is affirmed with costs.",
        "Damages were assessed at the date of the breach of contract.",
    ],
    "code": [
        "def parse(line): return line.strip().split(',')",
        "for item in items: total += item.price * item.quantity",
        "if not path.exists(): raise FileNotFoundError(path)",
        "class Cache: def __init__(self): self.data = {}",
        "with open(name) as f: rows = [r for r in f.readlines() if r]",
        "return sorted(values, key=lambda v: v.score, reverse=True)",
    ],
}


def write_jsonl(path: Path, lines: int = 60) -> list[str]:
    """`lines` documents of the three kinds in turn, each at least 240 characters, all different."""
    rng = random.Random(0)
    texts = []
    with path.open("w") as f:
        for i in range(lines):
            label = list(KINDS)[i % len(KINDS)]
            sentences: list[str] = []
            while len(" ".join(sentences)) < 240:
                sentences.append(rng.choice(KINDS[label]))
            texts.append(" ".join(sentences))
            f.write(json.dumps({"text": texts[-1], "label": label}) + "\n")
    return texts


def write_model(path: Path, texts: list[str]) -> None:
    """A tiny Llama and a byte-level BPE tokenizer trained on `texts`, as a Hugging Face directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from conftest import tiny_llama

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,  # few merges: a 240-character line stays well above 80 tokens
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>")
    model = tiny_llama(
        vocab_size=len(tokenizer),
        num_hidden_layers=4,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def stop_groups(groups: list[int], grace_s: float = 15.0) -> None:
    """SIGTERM every process group the blocks started, then SIGKILL what is left after `grace_s`."""

    def alive(group: int) -> bool:
        try:
            os.killpg(group, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    for group in groups:
        if alive(group):
            os.killpg(group, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while any(alive(g) for g in groups) and time.monotonic() < deadline:
        time.sleep(0.2)
    for group in groups:
        if alive(group):
            os.killpg(group, signal.SIGKILL)


# -- the tests ----------------------------------------------------------------------------------------


def test_readme_is_an_operators_guide_of_at_most_200_lines() -> None:
    lines = README.read_text().count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; keep it at most {MAX_README_LINES}"


def test_only_the_quick_start_is_skipped() -> None:
    blocks = readme_blocks(README.read_text())
    skipped = [b for b in blocks if b.skip is not None]
    assert len(skipped) <= len(SKIPPABLE), [b.line for b in skipped]
    for block in skipped:
        assert block.language == "bash", f"README.md:{block.line}: only bash blocks are ever skipped"
        assert set(commands(block.code)) <= SKIPPABLE, (
            f"README.md:{block.line}: a skipped block may only run {sorted(SKIPPABLE)}, "
            f"not {commands(block.code)}"
        )
    assert any(b.language == "bash" and b.skip is None for b in blocks), "no README command is tested"


def test_relative_links_name_existing_files() -> None:
    reports = ROOT / "docs" / "research" / "results"  # written by `chameleon eval`, not by hand
    pages = [README, *(p for p in sorted((ROOT / "docs").rglob("*.md")) if reports not in p.parents)]
    missing = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                continue
            path = (page.parent / target.split("#", 1)[0]).resolve()
            if not path.exists():
                missing.append(f"{page.relative_to(ROOT)}: {target}")
    assert not missing, "\n".join(missing)


@pytest.mark.timeout(2400)
def test_readme_commands_run(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    texts = write_jsonl(work / "my.jsonl")
    write_model(work / "my-model", texts)
    grpc, metrics, http = free_ports(3)
    ports = {"grpc": grpc, "metrics": metrics, "http": http}
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    }
    runnable = [
        b for b in readme_blocks(README.read_text()) if b.skip is None and b.language in ("bash", "python")
    ]
    groups: list[int] = []
    failures: list[str] = []
    try:
        for number, block in enumerate(runnable):
            code = substitute(block.code, ports)
            log = tmp_path / f"block-{number}-line-{block.line}.log"
            if block.language == "bash":
                command = ["bash", "-c", "set -euo pipefail\n" + code]
            else:
                script = tmp_path / f"block-{number}.py"
                script.write_text(code)
                command = [sys.executable, str(script)]
            with log.open("w") as out:
                process = subprocess.Popen(
                    command, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                )
                groups.append(process.pid)
                try:
                    code_returned = process.wait(timeout=BLOCK_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
                    code_returned = None
            output = log.read_text(errors="replace")
            problems = []
            if code_returned != 0:
                problems.append("timed out" if code_returned is None else f"exit status {code_returned}")
            for key, patterns in EXPECTED.items():
                if key in block.code:
                    problems += [f"no match for {p!r}" for p in patterns if not re.search(p, output)]
            if problems:
                failures.append(
                    f"README.md:{block.line} ({block.language}): {'; '.join(problems)}\n"
                    f"--- ran:\n{code}--- output (tail):\n{output[-3000:]}"
                )
    finally:
        stop_groups(groups)
    assert runnable, "README.md has no block to run"
    assert not failures, "\n\n".join(failures)
