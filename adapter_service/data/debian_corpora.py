"""Texts of very different kinds from Debian packages: scripture, jokes and quotes, dictionaries.

They give the mixed corpus its headroom (kinds of text far apart, where one adapter per kind pays):
the King James Bible (``bible-kjv-text``, extracted with the ``bible`` tool of ``bible-kjv``), the
``fortunes`` cookie files, Webster's 1913 (``dict-gcide``) and the computing glossaries FOLDOC and the
Jargon File (``dict-foldoc``, ``dict-jargon``). `fetch` gets them once through the ordinary Debian
client (``apt-get download``, then ``dpkg -x``, no root needed) into a data folder; the readers only
ever read that folder, so nothing is downloaded while training or testing.

Short items (a fortune, a dictionary entry) are joined with their neighbours from the same file into
documents of at least `min_chars`, in file order, so a document is a stretch of the source's own text
and no item is in two documents (splits stay clean).

`fetch` also gets the Debian kinds of the ``traffic`` corpus (`TRAFFIC_PACKAGES`: shell scripts, man
pages, config files; read by `traffic_corpora`), into the same folder; a folder fetched before they
were added is topped up with them (`traffic_ready` says whether they are there, `ready` whether the
mixed corpus's texts are).
"""

from __future__ import annotations

import gzip
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = [
    "PACKAGES",
    "TRAFFIC_PACKAGES",
    "data_root",
    "fetch",
    "missing_message",
    "read_dictd",
    "read_fortunes",
    "read_kjv",
    "ready",
    "traffic_ready",
]

# The traffic corpus's shell scripts, man pages (the Linux man-pages project) and config files.
TRAFFIC_PACKAGES = (
    "bash-completion",
    "manpages",
    "manpages-dev",
    "apache2",
    "exim4-config",
    "fail2ban",
    "nginx-common",
)
# The bible-kjv package is only needed for its extraction tool; its text is in bible-kjv-text.
PACKAGES = (
    "bible-kjv",
    "bible-kjv-text",
    "fortunes",
    "dict-gcide",
    "dict-foldoc",
    "dict-jargon",
    *TRAFFIC_PACKAGES,
)
FETCH_COMMAND = "chameleon fetch-corpora"
KJV_FILE = "kjv.txt"
FORTUNES_DIR = "tree/usr/share/games/fortunes"
DICTD_DIR = "tree/usr/share/dictd"
SHELL_DIR = "tree/usr/share/bash-completion"
MAN_DIR = "tree/usr/share/man"
CONFIG_DIRS = ("tree/etc/apache2", "tree/etc/exim4", "tree/etc/fail2ban", "tree/etc/nginx")
_DICTD_DIGITS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def data_root() -> Path:
    """Where fetched Debian texts live: $CHAMELEON_DATA/debian, else ~/.cache/chameleon/debian."""
    base = os.environ.get("CHAMELEON_DATA")
    return (Path(base) if base else Path.home() / ".cache" / "chameleon") / "debian"


def missing_message(root: Path) -> str:
    return f"the Debian texts are not in {root}; get them once with: {FETCH_COMMAND}"


def ready(root: Path) -> bool:
    """Whether `fetch` has completed in root for the mixed corpus's texts."""
    return (root / KJV_FILE).is_file() and (root / FORTUNES_DIR).is_dir() and (root / DICTD_DIR).is_dir()


def traffic_ready(root: Path) -> bool:
    """Whether root holds the traffic corpus's Debian texts (man2 and man7: both man-pages packages)."""
    folders = (SHELL_DIR, f"{MAN_DIR}/man2", f"{MAN_DIR}/man7", *CONFIG_DIRS)
    return all((root / folder).is_dir() for folder in folders)


def _missing_tool() -> str | None:
    return next((tool for tool in ("apt-get", "dpkg") if shutil.which(tool) is None), None)


def _top_up(root: Path) -> None:
    """Add the traffic packages to a folder fetched without them, where apt-get and dpkg exist (where
    they do not, the mixed texts were copied in, and the traffic corpus says how to get its own)."""
    tool = _missing_tool()
    if tool is not None:
        log.warning("%s not found: the traffic corpus's Debian texts are not fetched into %s", tool, root)
        return
    debs = root / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    subprocess.run(["apt-get", "download", *TRAFFIC_PACKAGES], cwd=debs, check=True)
    for deb in sorted(debs.glob("*.deb")):
        if deb.name.split("_", 1)[0] in TRAFFIC_PACKAGES:
            subprocess.run(["dpkg", "-x", str(deb), str(root / "tree")], check=True)
    log.info("traffic texts added to %s", root)


def fetch(root: Path | None = None, force: bool = False) -> Path:
    """Download the packages with apt-get, unpack them with dpkg -x and extract the KJV text; in a
    folder that has the mixed texts already, only add the traffic packages if they are missing."""
    root = root or data_root()
    if ready(root) and not force:
        if not traffic_ready(root):
            _top_up(root)
        log.info("Debian texts already in %s", root)
        return root
    tool = _missing_tool()
    if tool is not None:
        raise RuntimeError(
            f"{tool} not found: fetching the Debian texts needs a Debian or Ubuntu system "
            f"(packages: {', '.join(PACKAGES)})"
        )
    debs = root / "debs"
    tree = root / "tree"
    debs.mkdir(parents=True, exist_ok=True)
    subprocess.run(["apt-get", "download", *PACKAGES], cwd=debs, check=True)
    for deb in sorted(debs.glob("*.deb")):
        subprocess.run(["dpkg", "-x", str(deb), str(tree)], check=True)
    tool = tree / "usr/bin/bible"
    # -l0 would still wrap; a very wide line keeps one verse per line.
    result = subprocess.run(
        [str(tool), "-l100000", "-p", str(tree / "usr/lib"), "gen1:1-rev22:21"],
        check=True,
        capture_output=True,
    )
    (root / KJV_FILE).write_bytes(result.stdout)
    log.info("Debian texts ready in %s", root)
    return root


def chunks(items: Iterable[str], min_chars: int, separator: str) -> Iterator[str]:
    """Consecutive items joined until each piece reaches min_chars (a short tail is dropped)."""
    current: list[str] = []
    size = -len(separator)  # n items take n - 1 separators
    for item in items:
        current.append(item)
        size += len(item) + len(separator)
        if size >= min_chars:
            yield separator.join(current)
            current, size = [], -len(separator)


def read_kjv(root: Path) -> Iterator[tuple[str, str]]:
    """(chapter id, text) per chapter, verse numbers dropped, one verse per line."""
    path = root / KJV_FILE
    if not path.is_file():
        raise FileNotFoundError(missing_message(root))
    chapter: str | None = None
    verses: list[str] = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        text = line.strip()
        if not text:
            continue
        head, _, rest = text.partition(" ")
        # Verses are indented; headings never are ("1 Samuel 1" is a heading, not verse 1).
        if line[:1].isspace() and head.isdigit() and rest:
            verses.append(rest.strip())
        elif verses or chapter is None:  # a heading such as "Genesis 1" starts the next chapter
            if chapter is not None and verses:
                yield chapter, "\n".join(verses)
            chapter, verses = text, []
        else:
            chapter = text
    if chapter is not None and verses:
        yield chapter, "\n".join(verses)


def read_fortunes(root: Path, min_chars: int) -> Iterator[tuple[str, str]]:
    """(file#n, text): runs of consecutive fortunes of one category file, '%'-separated as in the file."""
    folder = root / FORTUNES_DIR
    if not folder.is_dir():
        raise FileNotFoundError(missing_message(root))
    for path in sorted(folder.iterdir()):
        if path.suffix or not path.is_file() or path.name in ("ascii-art",):  # .dat/.u8 are indexes
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        items = [item.strip("\n") for item in re.split(r"^%$", text, flags=re.M) if item.strip()]
        for n, chunk in enumerate(chunks(items, min_chars, "\n%\n")):
            yield f"{path.name}#{n}", chunk


def _dictd_number(text: str) -> int:
    value = 0
    for char in text:
        value = value * 64 + _DICTD_DIGITS.index(char)
    return value


def read_dictd(root: Path, name: str, min_chars: int) -> Iterator[tuple[str, str]]:
    """(name#n, text): runs of consecutive entries of a dictd dictionary, in the file's order.

    Entries come from the .index (headword, base-64 offset, length); several headwords may point at
    one entry, which is kept once; the 00-database-* entries (the dictionary's own metadata) are
    skipped, under whatever other headwords they are also listed.
    """
    folder = root / DICTD_DIR
    index, data = folder / f"{name}.index", folder / f"{name}.dict.dz"
    if not index.is_file() or not data.is_file():
        raise FileNotFoundError(missing_message(root))
    raw = gzip.decompress(data.read_bytes())  # dictzip is gzip with a seek table
    spans, metadata = set(), set()
    for line in index.read_text(encoding="utf-8", errors="replace").splitlines():
        fields = line.split("\t")
        if len(fields) < 3:
            continue
        span = (_dictd_number(fields[1]), _dictd_number(fields[2]))
        # The metadata entries may also be listed under other names (gcide: 00-gcide-long, ...).
        is_metadata = fields[0].startswith(("00-database", "00database"))
        (metadata if is_metadata else spans).add(span)
    entries = (raw[o : o + n].decode("utf-8", errors="replace").strip() for o, n in sorted(spans - metadata))
    for n, chunk in enumerate(chunks((e for e in entries if e), min_chars, "\n\n")):
        yield f"{name}#{n}", chunk
