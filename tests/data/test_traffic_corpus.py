"""The `traffic` corpus: its readers on small fixture folders, roff to text, the fetch of its Debian
packages, and the preset (on fixtures, and on the real texts when they are there)."""

from __future__ import annotations

import gzip
import importlib.util
import shutil
import subprocess
import sysconfig
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from adapter_service.data import corpora, debian_corpora, traffic_corpora
from adapter_service.data.corpora import PRESETS, Document, load_documents, split_documents
from adapter_service.data.debian_corpora import (
    CONFIG_DIRS,
    DICTD_DIR,
    FETCH_COMMAND,
    FORTUNES_DIR,
    KJV_FILE,
    MAN_DIR,
    PACKAGES,
    SHELL_DIR,
    TRAFFIC_PACKAGES,
    fetch,
    ready,
    traffic_ready,
)
from adapter_service.data.traffic_corpora import (
    KINDS,
    read_code,
    read_config,
    read_dialogue,
    read_docs,
    read_man,
    read_shell,
    roff_to_text,
    stretches,
)

MIN = 100  # min_chars for the fixtures: small files still give several documents


def lines(tag: str, n: int, width: int = 30) -> str:
    """n distinct lines of about `width` characters."""
    return "\n".join(f"{tag} line {i} ".ljust(width, "x") for i in range(n))


def blocks(tag: str, count: int, n: int = 3) -> str:
    """count blank-line-separated blocks of n lines each (about 95 characters a block)."""
    return "\n\n".join(lines(f"{tag}{b}", n) for b in range(count)) + "\n"


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def by_source(items: list[tuple[str, str, str, str]]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = defaultdict(list)
    for _, source, doc_id, _ in items:
        found[source].append(doc_id)
    return dict(found)


# ------------------------------------------------------------------------------------------- stretches


def test_stretches_are_verbatim_runs_of_lines() -> None:
    """Each run is the text's own consecutive lines, at least min_chars, ending at the first blank line
    after that (or at max_chars); together they cover the text in order, less the short tail."""
    text = "\n\n" + blocks("a", 7) + "\n\n\n" + lines("tail", 1)
    runs = list(stretches(text, 150))
    assert all(len(r) >= 150 and r in text and r == r.strip() for r in runs)
    assert [r.count("\n\n") for r in runs] == [1, 1, 1]  # two blocks each: ends at the next blank line
    joined = "\n\n".join(runs)
    assert joined == blocks("a", 6).strip()  # in order, nothing twice; block 7 and the tail dropped
    # max_chars cuts inside a block too long to wait for a blank line.
    long = lines("long", 20)
    cut = list(stretches(long, 50, max_chars=100))
    assert all(100 <= len(r) < 131 for r in cut) and "\n".join(cut) in long
    assert list(stretches("short", 50)) == []


# ------------------------------------------------------------------------------------------------ code


def test_read_code_sources_and_skips(tmp_path: Path) -> None:
    """Sources are top-level modules and packages; tests, IDLE, encodings, pydoc_data, site-packages and
    non-importable folders are never read; files in sorted order, ids per file."""
    lib = tmp_path / "lib"
    write(lib / "os.py", blocks("os", 5))
    write(lib / "json" / "__init__.py", blocks("jsoninit", 3))
    write(lib / "json" / "decoder.py", blocks("decoder", 3))
    write(lib / "asyncio" / "events.py", blocks("events", 3))
    write(lib / "notes.txt", blocks("notpython", 3))
    for skipped in (
        "test/test_os.py",
        "json/tests/test_decoder.py",
        "idlelib/editor.py",
        "idlelib/idle_test/test_x.py",
        "encodings/cp1252.py",
        "pydoc_data/topics.py",
        "site-packages/numpy/core.py",
        "config-3.11-x86_64-linux-gnu/python-config.py",
        "_sysconfigdata__linux_x86_64-linux-gnu.py",
    ):
        write(lib / skipped, blocks("skipped", 3))
    (lib / "alias.py").symlink_to(lib / "os.py")
    items = list(read_code(lib, MIN))
    assert {label for label, *_ in items} == {"code"}
    assert not any("skipped" in t or "notpython" in t for *_, t in items)
    sources = by_source(items)
    assert list(sources) == ["code:asyncio", "code:json", "code:os"]
    assert sources["code:json"] == ["code:json/__init__.py#0", "code:json/decoder.py#0"]
    assert sources["code:os"] == ["code:os.py#0", "code:os.py#1"]
    assert items == list(read_code(lib, MIN))
    with pytest.raises(FileNotFoundError, match="no standard library"):
        list(read_code(tmp_path / "missing", MIN))


def test_read_code_on_this_interpreter() -> None:
    """The real standard library: json and asyncio are sources, no test code is read."""
    items = list(read_code(Path(sysconfig.get_paths()["stdlib"]), 600))
    sources = by_source(items)
    assert {"code:json", "code:asyncio", "code:os"} <= set(sources)
    assert not any(s in sources for s in ("code:test", "code:idlelib", "code:encodings"))
    assert len({i for _, _, i, _ in items}) == len(items) > 1000


# ------------------------------------------------------------------------------------------------ docs


def test_read_docs_sources_and_nested_topics() -> None:
    """One source per topic; a paragraph that a longer topic repeats stays with the shorter topic only;
    the longer topic's own text on either side is cut as two runs (each run's short tail dropped)."""
    shared = "Shared paragraph " + "s" * 90
    topics = {
        "big": f"{blocks('bigA', 3)}\n{shared}\n\n{blocks('bigB', 3)}",
        "small": f"{blocks('small', 2)}\n{shared}\n",
        "short": "Too short.",
    }
    items = list(read_docs(MIN, topics))
    assert {label for label, *_ in items} == {"docs"}
    assert by_source(items) == {
        "docs:big": ["docs:big#0", "docs:big#1"],
        "docs:small": ["docs:small#0", "docs:small#1"],
    }
    texts = {i: t for _, _, i, t in items}
    assert texts["docs:small#1"] == shared
    assert texts["docs:big#0"] == blocks("bigA", 2).strip()  # bigA2, too short alone, is dropped
    assert texts["docs:big#1"] == blocks("bigB", 2).strip()


def test_read_docs_default_is_pydoc_topics() -> None:
    items = list(read_docs(600))
    sources = by_source(items)
    assert "docs:debugger" in sources and len(sources) > 40


# --------------------------------------------------------------------------------------- shell, config


def test_read_shell(tmp_path: Path) -> None:
    """bash_completion and completions/*, one source per file; links (aliases) and helpers skipped."""
    folder = tmp_path / SHELL_DIR
    write(folder / "bash_completion", blocks("main", 3))
    write(folder / "completions" / "git", blocks("git", 2))
    write(folder / "completions" / "apt", blocks("apt", 2))
    write(folder / "helpers" / "perl", blocks("perl", 3))
    (folder / "completions" / "gitk").symlink_to("git")
    items = list(read_shell(tmp_path, MIN))
    assert by_source(items) == {
        "shell:bash_completion": ["shell:bash_completion#0"],
        "shell:completions/apt": ["shell:completions/apt#0"],
        "shell:completions/git": ["shell:completions/git#0"],
    }
    assert items[0] == (
        "shell",
        "shell:bash_completion",
        "shell:bash_completion#0",
        blocks("main", 2).strip(),
    )


def write_config(root: Path) -> None:
    for folder in CONFIG_DIRS:
        write(root / folder / "main.conf", blocks(Path(folder).name, 2))
    write(root / "tree/etc/apache2/mods-available/ssl.load", "LoadModule ssl_module ssl.so\n")  # short
    write(root / "tree/etc/fail2ban/filter.d/sshd.conf", blocks("sshd", 2))
    write(root / "tree/etc/fail2ban/filter.d/ignore/check", "#!/usr/bin/python3\n" + blocks("script", 2))
    write(root / "tree/etc/exim4/exim4.conf.template", blocks("generated", 3))
    write(root / "tree/etc/nginx/binary", b"\0\1" * 200)
    write(root / "tree/etc/other/elsewhere.conf", blocks("other", 3))


def test_read_config(tmp_path: Path) -> None:
    """Files under the config folders, one source each; scripts, binaries, the generated exim4
    template and files elsewhere in /etc skipped."""
    write_config(tmp_path)
    items = list(read_config(tmp_path, MIN))
    assert list(by_source(items)) == [
        "config:etc/apache2/main.conf",
        "config:etc/exim4/main.conf",
        "config:etc/fail2ban/filter.d/sshd.conf",
        "config:etc/fail2ban/main.conf",
        "config:etc/nginx/main.conf",
    ]
    assert items[-1][2] == "config:etc/nginx/main.conf#0"


def test_debian_readers_name_the_fetch_command(tmp_path: Path) -> None:
    for read in (read_shell, read_man, read_config):
        with pytest.raises(FileNotFoundError, match=FETCH_COMMAND):
            list(read(tmp_path, MIN))


# ------------------------------------------------------------------------------------------------- man

PAGE = r""".\" Copyright comment, not text
.TH OPEN 2 2023-02-05 "Linux man-pages 6.03"
.de XX
.B never shown
..
.if n \{\
.ds never shown
.\}
.SH NAME
open \- open a file
.SH SYNOPSIS
.nf
.BI "int open(const char *" pathname ", int " flags );
.fi
.SH DESCRIPTION
The
.BR open ()
call opens
.I pathname
(see \fBpath_resolution\fP(7)).
Quotes: \(lqa\(rq, \[aq]b\[aq], em\(emdash, caf\[u00E9], \(:a \e \- \&.
A long \
line joined.
.PP
.TP
.B O_APPEND
Append mode.
.IP \[bu] 2
A bullet.
.UR https://example.org
A link
.UE .
.SS Table
.TS
allbox;
lb lb
l l.
Interface	Value
T{
.BR open ()
T}	MT-Safe
.TE
"""


def test_roff_to_text() -> None:
    assert roff_to_text(PAGE) == (
        "NAME\nopen - open a file\n\n"
        "SYNOPSIS\nint open(const char *pathname, int flags);\n\n"
        "DESCRIPTION\nThe open() call opens pathname (see path_resolution(7)). "
        "Quotes: \u201ca\u201d, 'b', em\u2014dash, caf\u00e9, \u00e4 \\ - . A long line joined.\n\n"
        "O_APPEND\nAppend mode.\n\n"
        "\u2022 A bullet. A link <https://example.org>.\n\n"
        "Table\nInterface  Value\nopen()  MT-Safe"
    )
    assert roff_to_text(".so man2/open.2\n") == ""


def test_read_man(tmp_path: Path) -> None:
    """One source per page, gzipped or not; links, .so pointers and translations skipped."""
    folder = tmp_path / MAN_DIR
    write(folder / "man2" / "open.2.gz", gzip.compress(PAGE.encode()))
    write(folder / "man7" / "signal.7", PAGE.replace("open", "signal"))
    write(folder / "man2" / "creat.2.gz", gzip.compress(b".so man2/open.2\n"))
    write(folder / "de" / "man1" / "ls.1", PAGE)
    (folder / "man2" / "openat.2.gz").symlink_to("open.2.gz")
    items = list(read_man(tmp_path, MIN))
    assert [(s, i) for _, s, i, _ in items] == [
        ("man:man2/open.2", "man:man2/open.2#0"),
        ("man:man2/open.2", "man:man2/open.2#1"),
        ("man:man7/signal.7", "man:man7/signal.7#0"),
        ("man:man7/signal.7", "man:man7/signal.7#1"),
    ]
    assert items[0][3].startswith("NAME\nopen - open a file")


# --------------------------------------------------------------------------------------------- dialogue

YAML = """categories:
- greetings
conversations:
- - Hello
  - Hi there, how are you doing today?
- - What is 6 times 7?
  - 42
- - Good morning, how are you?
  - I am doing well,
    thank you.
  - Glad to hear it.
- just one line
"""


def test_read_dialogue(tmp_path: Path) -> None:
    """Conversations as A/B transcripts, joined in file order into documents of min_chars; one source
    per file; the short tail is dropped."""
    write(tmp_path / "greetings.yml", YAML)
    write(tmp_path / "ai.yml", YAML.replace("Hello", "Hello robot"))
    write(tmp_path / "empty.yml", "categories:\n- empty\n")
    write(tmp_path / "notes.txt", YAML)
    items = list(read_dialogue(tmp_path, 60))
    assert [(s, i) for _, s, i, _ in items] == [
        ("dialogue:ai.yml", "dialogue:ai.yml#0"),
        ("dialogue:ai.yml", "dialogue:ai.yml#1"),
        ("dialogue:greetings.yml", "dialogue:greetings.yml#0"),
        ("dialogue:greetings.yml", "dialogue:greetings.yml#1"),
    ]
    assert items[2][3] == "A: Hello\nB: Hi there, how are you doing today?\n\nA: What is 6 times 7?\nB: 42"
    # A conversation long enough stands alone; the last one, too short alone, is dropped.
    assert items[3][3] == "A: Good morning, how are you?\nB: I am doing well, thank you.\nA: Glad to hear it."
    with pytest.raises(FileNotFoundError, match="conversation files"):
        list(read_dialogue(tmp_path / "missing", 60))


# ----------------------------------------------------------------------------------------------- fetch


def write_mixed(root: Path) -> None:
    """What `ready` looks for: the mixed corpus's texts, fetched before the traffic corpus existed."""
    write(root / KJV_FILE, "\nGenesis 1\n\n  1 In the beginning.\n")
    (root / FORTUNES_DIR).mkdir(parents=True)
    (root / DICTD_DIR).mkdir(parents=True)


def test_packages_and_ready(tmp_path: Path) -> None:
    """A fresh fetch downloads the traffic packages with the others; traffic_ready checks their folders."""
    assert set(TRAFFIC_PACKAGES) <= set(PACKAGES) and len(set(PACKAGES)) == len(PACKAGES)
    write_mixed(tmp_path)
    assert ready(tmp_path) and not traffic_ready(tmp_path)
    write_config(tmp_path)
    for folder in (SHELL_DIR, f"{MAN_DIR}/man2", f"{MAN_DIR}/man7"):
        (tmp_path / folder).mkdir(parents=True)
    assert traffic_ready(tmp_path)


def test_fetch_tops_up_a_folder_fetched_before(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the mixed texts there, fetch downloads and unpacks only the traffic packages (a .deb
    already in debs/ is not unpacked again); once they are there, it runs nothing."""
    write_mixed(tmp_path)
    write(tmp_path / "debs" / "fortunes_1.0_all.deb", b"")
    calls: list[list[str]] = []

    def fake_run(args: list[str], cwd: Path | None = None, **kwargs: object) -> None:
        calls.append(list(args))
        if args[:2] == ["apt-get", "download"]:
            for package in args[2:]:
                (Path(cwd) / f"{package}_1%3a2.0_all.deb").write_bytes(b"")
        elif args[:2] == ["dpkg", "-x"] and args[2].endswith("fail2ban_1%3a2.0_all.deb"):
            write_config(tmp_path)
            for folder in (SHELL_DIR, f"{MAN_DIR}/man2", f"{MAN_DIR}/man7"):
                (tmp_path / folder).mkdir(parents=True, exist_ok=True)

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setattr(debian_corpora.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    assert fetch(tmp_path) == tmp_path
    assert calls[0] == ["apt-get", "download", *TRAFFIC_PACKAGES]
    debs = sorted(f"{p}_1%3a2.0_all.deb" for p in TRAFFIC_PACKAGES)
    assert calls[1:] == [["dpkg", "-x", str(tmp_path / "debs" / d), str(tmp_path / "tree")] for d in debs]
    assert traffic_ready(tmp_path)
    calls.clear()
    assert fetch(tmp_path) == tmp_path and calls == []


def test_fetch_without_tools_keeps_the_mixed_texts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Mixed texts copied to a machine without apt-get: fetch still succeeds, and says what it skipped."""
    write_mixed(tmp_path)
    monkeypatch.setattr(debian_corpora.shutil, "which", lambda tool: None)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail(f"subprocess.run called: {a}"))
    with caplog.at_level("WARNING"):
        assert fetch(tmp_path) == tmp_path
    assert "apt-get not found" in caplog.text


# ---------------------------------------------------------------------------------------------- preset


def write_traffic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fixture data for every kind (docs: this interpreter's pydoc topics), found where the preset
    looks: $CHAMELEON_DATA/debian, the stdlib path, the chatterbot_corpus package folder."""
    root = tmp_path / "data" / "debian"
    write_mixed(root)
    write_config(root)
    page = PAGE.replace("Append mode.", "Append mode. " * 60)  # DEBIAN_CHUNK_CHARS: 600
    conversations = "".join(
        f"- - Question {i} of many?\n  - Answer {i}, at some length.\n" for i in range(40)
    )
    for n in range(4):
        write(root / SHELL_DIR / "completions" / f"tool{n}", blocks(f"tool{n}", 20))
        write(root / MAN_DIR / f"man{n + 1}" / f"page{n}.{n + 1}", page.replace("open", f"page{n}"))
        write(root / f"tree/etc/fail2ban/jail{n}.conf", blocks(f"jail{n}", 20))
        write(tmp_path / "lib" / f"module{n}.py", blocks(f"module{n}", 20))
        write(tmp_path / "lib" / f"package{n}" / "core.py", blocks(f"package{n}", 20))
        write(
            tmp_path / "pkg" / traffic_corpora.DIALOGUE_DIR / f"topic{n}.yml",
            f"conversations:\n{conversations}",
        )
    (root / SHELL_DIR / "bash_completion").write_text(blocks("main", 20))
    for folder in ("man2", "man7"):
        (root / MAN_DIR / folder).mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("CHAMELEON_DATA", str(tmp_path / "data"))
    monkeypatch.setattr(sysconfig, "get_paths", lambda *a, **k: {"stdlib": str(tmp_path / "lib")})
    monkeypatch.setattr(corpora, "_package_dir", lambda package, preset: tmp_path / "pkg")


def test_traffic_preset_on_fixtures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every kind labelled, every document with a source, ids unique and stable, and the split by
    source never puts one source in two splits."""
    write_traffic(tmp_path, monkeypatch)
    docs = PRESETS["traffic"].read()
    assert docs == PRESETS["traffic"].read()
    assert sorted({d.label for d in docs}) == sorted(KINDS)
    assert all(d.source and d.source.startswith(f"{d.label}:") for d in docs)
    assert len({d.doc_id for d in docs}) == len(docs)
    assert {d.source for d in docs if d.label == "code"} == {
        *(f"code:module{n}" for n in range(4)),
        *(f"code:package{n}" for n in range(4)),
    }
    docs = [Document(d.text, d.label, d.doc_id, d.source) for d in docs if len(d.text) >= 100]
    splits = split_documents(docs, seed=0, max_per_label=30, by_source=True)
    assert splits.labels() == sorted(KINDS)
    seen = [{d.source for d in part} for part in (splits.train, splits.validation, splits.test)]
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])


def test_traffic_preset_without_its_debian_texts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Mixed texts fetched but not the traffic ones: reading says to run the fetch command."""
    write_traffic(tmp_path, monkeypatch)
    root = tmp_path / "data" / "debian"
    for folder in (SHELL_DIR, MAN_DIR, *CONFIG_DIRS):
        shutil.rmtree(root / folder)
    with pytest.raises(FileNotFoundError, match=FETCH_COMMAND):
        PRESETS["traffic"].read()
    message = corpora.missing_preset_message("traffic")
    assert "pip install --no-deps chatterbot-corpus==1.3.3" in message and FETCH_COMMAND in message


def real_traffic_absent() -> str | None:
    if importlib.util.find_spec("chatterbot_corpus") is None:
        return f"chatterbot-corpus is not installed ({PRESETS['traffic'].install})"
    root = debian_corpora.data_root()
    if not (ready(root) and traffic_ready(root)):
        return f"the traffic corpus's Debian texts are not in {root} ({FETCH_COMMAND})"
    return None


@pytest.mark.skipif(real_traffic_absent() is not None, reason=f"real data absent: {real_traffic_absent()}")
def test_traffic_preset_on_the_real_texts() -> None:
    """Skipped only when the data is absent (the reason says which part). Every kind gives hundreds of
    documents from many sources, and a capped split by source keeps every source in one split."""
    docs = load_documents("traffic")
    counts = Counter(d.label for d in docs)
    sources = {label: {d.source for d in docs if d.label == label} for label in KINDS}
    assert set(counts) == set(KINDS) and min(counts.values()) >= 250, counts
    assert min(len(s) for s in sources.values()) >= 15, {k: len(s) for k, s in sources.items()}
    assert {"code:json", "code:asyncio", "docs:debugger", "man:man2/open.2"} <= set().union(*sources.values())
    assert "dialogue:greetings.yml" in sources["dialogue"]
    splits = split_documents(docs, seed=0, max_per_label=300, by_source=True)
    seen = [{d.source for d in part} for part in (splits.train, splits.validation, splits.test)]
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    assert all(
        {d.label for d in part} == set(KINDS) for part in (splits.train, splits.validation, splits.test)
    )
