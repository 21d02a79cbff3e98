"""Texts of the kinds a model server is sent side by side: code, docs, shell, man pages, config, dialogue.

The `traffic` corpus mixes them, one label per kind, so that an adapter per kind has to be chosen from
the request alone, as in production where one batch holds a code completion next to a chat turn. Each
kind is real text that can be had offline:

* ``code``: Python source of the running interpreter's standard library, without its tests, IDLE,
  site-packages, the generated codec tables of ``encodings`` and ``pydoc_data`` (the ``docs`` text);
  source: the top-level module or package (``json``, ``asyncio``), so a package never straddles splits;
* ``docs``: the language reference and library topics of ``pydoc_data.topics`` (standard library, what
  ``help()`` prints), a paragraph that nested topics share kept in one of them; source: the topic;
* ``shell``: bash completion scripts of Debian's ``bash-completion``; source: the file;
* ``man``: the man pages of the fetched Debian packages, nearly all from the Linux man-pages project
  (``manpages``, ``manpages-dev``), roff turned into plain text here (no groff needed); source: the page;
* ``config``: the configuration files Debian's ``apache2``, ``exim4-config``, ``fail2ban`` and
  ``nginx-common`` install under /etc (scripts among them skipped); source: the file;
* ``dialogue``: the English conversations of the PyPI package ``chatterbot-corpus`` (YAML, read as
  data); source: the file (a topic such as ``greetings.yml``).

The Debian kinds are fetched with the mixed corpus's texts (`debian_corpora.fetch`, so ``chameleon
fetch-corpora``) into the same folder. Readers yield plain ``(label, source, doc_id, text)`` tuples in a
sorted, stable order; a text is cut into stretches of its own consecutive lines of at least `min_chars`
(short items, such as conversations, are joined with their neighbours of the same file instead), and
a piece shorter than that at the end of a text is dropped, so no line is in two documents.
"""

from __future__ import annotations

import gzip
import re
import unicodedata
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from adapter_service.data import debian_corpora
from adapter_service.data.debian_corpora import CONFIG_DIRS, MAN_DIR, SHELL_DIR, chunks

__all__ = [
    "KINDS",
    "read_code",
    "read_config",
    "read_dialogue",
    "read_docs",
    "read_man",
    "read_shell",
    "read_traffic",
    "roff_to_text",
]

KINDS = ("code", "docs", "shell", "man", "config", "dialogue")
# Skipped in the standard library: tests, IDLE, generated codec tables, the `docs` kind's own text.
CODE_SKIP = frozenset({"test", "tests", "idle_test", "idlelib", "encodings", "pydoc_data", "site-packages"})
# exim4.conf.template is generated from the exim4 conf.d files, which are read instead.
CONFIG_SKIP = frozenset({"exim4.conf.template"})
DIALOGUE_DIR = "data/english"  # inside the chatterbot_corpus package

Item = tuple[str, str, str, str]  # (label, source, doc_id, text)


def stretches(text: str, min_chars: int, max_chars: int | None = None) -> Iterator[str]:
    """Runs of the text's consecutive lines, each of at least min_chars, ending at the first blank line
    after that (a paragraph or block boundary) or at the line that reaches max_chars (default 4 x
    min_chars), so a run is a verbatim stretch of the text; a short tail is dropped."""
    limit = max_chars if max_chars is not None else 4 * min_chars
    lines: list[str] = []
    size = end = 0  # characters so far, and up to the last non-blank line
    for line in text.splitlines():
        if not line.strip():
            if end >= min_chars:
                yield "\n".join(lines).rstrip()
                lines, size, end = [], 0, 0
            elif lines:
                lines.append(line)
                size += len(line) + 1
            continue
        size += len(line) + (1 if lines else 0)
        lines.append(line)
        end = size
        if end >= limit:
            yield "\n".join(lines)
            lines, size, end = [], 0, 0
    if end >= min_chars:
        yield "\n".join(lines).rstrip()


def _read(path: Path) -> str | None:
    """A text file as UTF-8 (bad bytes replaced); None for binary files (a NUL byte)."""
    data = path.read_bytes()
    return None if b"\0" in data else data.decode("utf-8", errors="replace")


def _cut(label: str, source: str, name: str, text: str, min_chars: int) -> Iterator[Item]:
    for n, chunk in enumerate(stretches(text, min_chars)):
        yield label, f"{label}:{source}", f"{label}:{name}#{n}", chunk


def _files(folder: Path) -> list[Path]:
    """Regular files under folder, sorted, links skipped (bash-completion links aliases to one file)."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


# ------------------------------------------------------------------------------------------------- code


def read_code(stdlib: Path, min_chars: int) -> Iterator[Item]:
    """Chunks of the standard library's .py files under stdlib (see `CODE_SKIP`); only files at
    importable paths, so site-packages and build folders (``config-3.11-...``) are never read."""
    if not stdlib.is_dir():
        raise FileNotFoundError(f"no standard library at {stdlib}")
    for path in sorted(stdlib.rglob("*.py")):
        parts = path.relative_to(stdlib).with_suffix("").parts
        if any(p in CODE_SKIP or not p.isidentifier() for p in parts) or path.is_symlink():
            continue
        text = _read(path)
        if text is not None:
            yield from _cut("code", parts[0], "/".join(path.relative_to(stdlib).parts), text, min_chars)


# ------------------------------------------------------------------------------------------------- docs


def _unrepeated(texts: Mapping[str, str]) -> dict[str, list[str]]:
    """Each text's runs of consecutive paragraphs not already in a shorter text (shortest first, then by
    name): help topics nest (``specialnames`` holds ``attribute-access``), and a paragraph under two
    sources could land in two splits. Only paragraphs of at least 80 characters count as repeats."""
    seen: set[str] = set()
    runs: dict[str, list[str]] = {}
    for name in sorted(texts, key=lambda n: (len(texts[n]), n)):
        runs[name], current = [], []
        for paragraph in re.split(r"\n[ \t]*\n", texts[name]):
            key = paragraph.strip()
            if len(key) >= 80 and key in seen:
                if current:
                    runs[name].append("\n\n".join(current))
                current = []
                continue
            seen.add(key)
            current.append(paragraph)
        if current:
            runs[name].append("\n\n".join(current))
    return runs


def read_docs(min_chars: int, topics: Mapping[str, str] | None = None) -> Iterator[Item]:
    """Chunks of each help topic (default: ``pydoc_data.topics.topics``) in name order, each paragraph
    in one topic only (`_unrepeated`)."""
    if topics is None:
        import pydoc_data.topics

        topics = pydoc_data.topics.topics
    runs = _unrepeated(topics)
    for name in sorted(topics):
        pieces = (chunk for run in runs[name] for chunk in stretches(run, min_chars))
        for n, chunk in enumerate(pieces):
            yield "docs", f"docs:{name}", f"docs:{name}#{n}", chunk


# --------------------------------------------------------------------------------------- shell, config


def read_shell(root: Path, min_chars: int) -> Iterator[Item]:
    """Chunks of bash-completion's main script and its completions (``completions/git``)."""
    folder = root / SHELL_DIR
    if not folder.is_dir():
        raise FileNotFoundError(debian_corpora.missing_message(root))
    paths = [folder / "bash_completion", *_files(folder / "completions")]
    for path in paths:
        text = _read(path) if path.is_file() else None
        if text is not None:
            name = path.relative_to(folder).as_posix()
            yield from _cut("shell", name, name, text, min_chars)


def read_config(root: Path, min_chars: int) -> Iterator[Item]:
    """Chunks of the files under `CONFIG_DIRS` (``etc/fail2ban/jail.conf``); scripts (``#!``) and
    `CONFIG_SKIP` skipped."""
    tree = root / "tree"
    folders = [root / d for d in CONFIG_DIRS]
    if not all(f.is_dir() for f in folders):
        raise FileNotFoundError(debian_corpora.missing_message(root))
    for path in (p for f in folders for p in _files(f)):
        text = _read(path)
        if path.name not in CONFIG_SKIP and text is not None and not text.startswith("#!"):
            name = path.relative_to(tree).as_posix()
            yield from _cut("config", name, name, text, min_chars)


# -------------------------------------------------------------------------------------------------- man

# roff's special characters (\(xx, \[xx]) and predefined strings (\*(xx) that man pages use.
_GLYPHS = {
    "aq": "'", "dq": '"', "lq": "\u201c", "rq": "\u201d", "oq": "\u2018", "cq": "\u2019", "em": "\u2014",
    "en": "\u2013", "hy": "-", "mi": "-", "bu": "\u2022", "ha": "^", "ti": "~", "ga": "`", "pl": "+",
    "+-": "\u00b1", "mu": "\u00d7", "di": "\u00f7", "co": "\u00a9", "rg": "\u00ae", "tm": "\u2122",
    "dg": "\u2020", "de": "\u00b0", "sc": "\u00a7", "fm": "\u2032", "sd": "\u2033", "la": "\u27e8",
    "ra": "\u27e9", "<=": "\u2264", ">=": "\u2265", "!=": "\u2260", "->": "\u2192", "<-": "\u2190",
    "rs": "\\", "sl": "/", "ba": "|", "br": "|", "lB": "[", "rB": "]", "lC": "{", "rC": "}", "sh": "#",
    "Do": "$", "at": "@", "ul": "_", "ru": "_", "ss": "\u00df", "mc": "\u00b5", "12": "\u00bd",
    "14": "\u00bc", "34": "\u00be", "R": "\u00ae", "Tm": "\u2122", "--": "\u2014", 'L"': "\u201c",
    'R"': "\u201d",
}  # fmt: skip
_ACCENTS = {":": "\u0308", "'": "\u0301", "`": "\u0300", "^": "\u0302", "~": "\u0303"}
_SIMPLE = {"e": "\\", "-": "-", "~": " ", " ": " ", "0": " ", "t": "\t"}
_SILENT = frozenset("&|^c%:/,pdru!?){}")  # zero-width escapes and line-level controls
_ESCAPE = re.compile(
    r"""\\(?:
        \((?P<g2>..) | \[(?P<gn>[^\]]*)\] |
        \*(?:\((?P<s2>..)|\[(?P<sn>[^\]]*)\]|(?P<s1>.)) |
        N'(?P<num>\d+)' |
        [fF](?:\(..|\[[^\]]*\]|.) | s[-+]?(?:\(\d\d|\[\d+\]|\d) |
        [hvwoXDlLbSxRZHCk]'[^']*' | [nmMgVY](?:\(..|\[[^\]]*\]|.) | \$. | [\"\#].* |
        (?P<c>.) | $
    )""",
    re.X,
)


def _glyph(name: str) -> str:
    if name in _GLYPHS:
        return _GLYPHS[name]
    if re.fullmatch(r"u[0-9A-F]{4,6}", name):
        return chr(int(name[1:], 16))
    if len(name) == 2 and name[0] in _ACCENTS and name[1].isalpha():
        return name[1] + _ACCENTS[name[0]]  # \(:a is a with a diaeresis; composed below
    return ""


def _unescape(text: str) -> str:
    def replace(m: re.Match[str]) -> str:
        if (name := m["g2"] or m["gn"]) is not None:
            return _glyph(name)
        if (name := m["s2"] or m["sn"] or m["s1"]) is not None:
            return _GLYPHS.get(name, "")
        if m["num"] is not None:
            return chr(int(m["num"]))
        if m["c"] is not None:
            return _SIMPLE.get(m["c"], "" if m["c"] in _SILENT else m["c"])  # \\ \. \' stay as they are
        return ""  # fonts, sizes, motions, registers, comments

    if "\\" not in text:
        return text
    plain = _ESCAPE.sub(replace, text)
    return plain if plain.isascii() else unicodedata.normalize("NFC", plain)


_ARG = re.compile(r'"((?:[^"]|"")*)"?|((?:\\.|\S)+)')
_COMMENT = re.compile(r'(?<!\\)\\".*')
_CONTINUED = re.compile(r"(?<!\\)(?:\\\\)*\\$")  # an odd number of backslashes ends the line
_BREAKS = {"PP", "LP", "P", "sp", "HP", "ne", "bp"}
_FLUSHES = {"br", "in", "ti", "nf", "fi", "EX", "EE", "TE", "YS", "OP", "RS", "RE"}
_JOINED = {"BR", "RB", "IR", "RI", "BI", "IB"}  # alternating fonts, no space between arguments
_SPACED = {"B", "I", "SM", "SB"}
_BLOCKS = {"de", "de1", "dei", "am", "am1", "ami", "ig"}  # definitions and comments, up to '..'


def _args(line: str) -> list[str]:
    """A request's arguments: words, or double-quoted strings ("" a quote inside), comments dropped."""
    found = _ARG.finditer(_COMMENT.sub("", line))
    return [_unescape(m[2] if m[1] is None else m[1].replace('""', '"')) for m in found]


def _logical_lines(source: str) -> Iterator[str]:
    """Lines with escaped newlines (a line ending in one backslash) joined to the next."""
    pending = ""
    for line in source.splitlines():
        if line.endswith("\\") and _CONTINUED.search(line):
            pending += line[:-1]
        else:
            yield pending + line
            pending = ""
    if pending:
        yield pending


def roff_to_text(source: str) -> str:
    """Plain text of a man page's roff: headings, filled paragraphs, verbatim (.nf/.EX) blocks and tbl
    tables (cells two spaces apart); definitions, conditionals, fonts and motions dropped. Close to what
    `man` shows, without its line breaking and indentation."""
    out: list[str] = []
    para: list[str] = []
    fill, own_line, table, skip_to = True, False, "", ""
    url = ""
    heading_end = -1  # len(out) just after a heading or tag
    row: list[str] = []
    cell: list[str] | None = None  # inside a T{ ... T} table cell

    def flush() -> None:
        if para:
            out.append(" ".join(p for p in para if p))
            para.clear()

    def blank() -> None:
        flush()
        if out and out[-1] and len(out) != heading_end:  # no gap between a heading and its text
            out.append("")

    def emit(text: str) -> None:
        nonlocal own_line, heading_end
        if cell is not None:
            cell.append(text)
        elif own_line:  # a heading, or a .TP tag, stands on its own line
            flush()
            out.append(text)
            own_line = False
            heading_end = len(out)
        elif fill:
            para.append(text)
        else:
            out.append(text)

    def table_row(line: str) -> None:
        nonlocal cell
        parts = line.split("\t")
        if cell is not None:  # a text block's line, or its end and the rest of the row
            if not line.startswith("T}"):
                cell.append(_unescape(line).strip())
                return
            row.append(" ".join(c for c in cell if c))
            cell, parts = None, parts[1:]
        for part in parts:
            if part.strip() == "T{":
                cell = []
            else:
                row.append(_unescape(part).strip())
        if cell is None and row:
            out.append("  ".join(c for c in row if c).rstrip())
            row.clear()

    for line in _logical_lines(source):
        if skip_to:
            if (skip_to == ".." and line.strip() == "..") or (skip_to == "}" and "\\}" in line):
                skip_to = ""
            continue
        if table in ("options", "format"):
            if table == "options" and line.rstrip().endswith(";"):
                table = "format"
            elif line.rstrip().endswith("."):
                table = "data"
            else:
                table = "format"
            continue
        is_request = line[:1] in (".", "'")
        if table == "data" and not (is_request and cell is not None):
            name = line[1:].split(maxsplit=1)[0] if is_request and line[1:].strip() else ""
            if name == "TE":
                table = ""
                out.append("")
            elif name == "T&":
                table = "format"
            elif not is_request and line.strip() not in ("_", "=") and line.strip():
                table_row(line)
            continue
        if not is_request:
            if cell is not None and line.startswith("T}"):
                table_row(line)
                continue
            text = _unescape(line)
            if not line.strip():
                if fill:
                    blank()
                else:
                    out.append("")
            elif fill and line[:1].isspace():  # a leading space breaks the line in roff
                flush()
                emit(text.strip())
            else:
                emit(text.strip() if fill else text.rstrip())
            continue
        words = line[1:].strip().split(maxsplit=1)
        if not words:
            continue
        name, rest = words[0], words[1] if len(words) > 1 else ""
        args = _args(rest)
        if name in _BLOCKS:
            skip_to = ".."
        elif name in ("if", "ie", "el"):
            if "\\{" in line and "\\}" not in line:
                skip_to = "}"
        elif name == "so":
            return ""  # only a pointer to another page
        elif name in ("SH", "SS"):
            blank()
            own_line = True
            if args:
                emit(" ".join(args))
        elif name in ("TP", "TQ"):
            blank() if name == "TP" else flush()
            own_line = True
        elif name == "IP":
            blank()
            if args and args[0]:
                para.append(args[0])
        elif name == "SY":
            blank()
            para.extend(args[:1])
        elif name in _BREAKS:
            blank()
        elif name in _FLUSHES:
            flush()
            if name in ("nf", "EX"):
                fill = False
            elif name in ("fi", "EE"):
                fill = True
        elif name == "TS":
            blank()
            table = "options"
        elif name in _JOINED:
            emit("".join(args))
        elif name in _SPACED:
            if args:
                emit(" ".join(args))
        elif name in ("UR", "MT"):
            url = args[0] if args else ""
        elif name in ("UE", "ME"):
            suffix = f"<{url}>{''.join(args)}" if url else "".join(args)
            if para and fill and not own_line and cell is None:
                para.append(suffix)
            else:
                emit(suffix)
            url = ""
    flush()
    text = "\n".join(line.rstrip() for line in out)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def read_man(root: Path, min_chars: int) -> Iterator[Item]:
    """Chunks of each English man page (``man2/open.2``; translations, links and .so pointers skipped)."""
    folder = root / MAN_DIR
    sections = sorted(p for p in folder.glob("man[1-9]*") if p.is_dir()) if folder.is_dir() else []
    if not sections:
        raise FileNotFoundError(debian_corpora.missing_message(root))
    for path in (p for s in sections for p in _files(s)):
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = gzip.decompress(data)
        name = path.relative_to(folder).as_posix().removesuffix(".gz")
        text = roff_to_text(data.decode("utf-8", errors="replace"))
        yield from _cut("man", name, name, text, min_chars)


# --------------------------------------------------------------------------------------------- dialogue


def _conversation(turns: Iterable[object]) -> str:
    """A conversation as a transcript, speakers A and B taking turns."""
    return "\n".join(f"{'AB'[i % 2]}: {' '.join(str(t).split())}" for i, t in enumerate(turns))


def read_dialogue(folder: Path, min_chars: int) -> Iterator[Item]:
    """Runs of consecutive conversations of each chatterbot-corpus YAML file (``greetings.yml``) in the
    folder, in file order, joined with a blank line."""
    import yaml  # PyYAML comes with the training extra (transformers, huggingface_hub)

    files = sorted(folder.glob("*.yml")) if folder.is_dir() else []
    if not files:
        raise FileNotFoundError(f"no conversation files (*.yml) in {folder}")
    for path in files:
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's, where PyYAML has it
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=loader) or {}
        turns = [c if isinstance(c, list) else [c] for c in data.get("conversations") or []]
        items = [_conversation(t) for t in turns if t]
        for n, chunk in enumerate(chunks(items, min_chars, "\n\n")):
            yield "dialogue", f"dialogue:{path.name}", f"dialogue:{path.name}#{n}", chunk


# ------------------------------------------------------------------------------------------------- all


def read_traffic(root: Path, stdlib: Path, dialogue: Path, min_chars: int) -> Iterator[Item]:
    """Every kind, in `KINDS` order: Debian texts in root, the standard library at stdlib, and the
    chatterbot-corpus conversation folder (``chatterbot_corpus/data/english``)."""
    yield from read_code(stdlib, min_chars)
    yield from read_docs(min_chars)
    yield from read_shell(root, min_chars)
    yield from read_man(root, min_chars)
    yield from read_config(root, min_chars)
    yield from read_dialogue(dialogue, min_chars)
