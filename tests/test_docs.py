"""The repository stands alone: no references to documents outside it, no dead doc links."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Assembled from pieces so that this file does not match its own search.
FORBIDDEN = ("DESIGN" + ".md", "OFFICIAL_NBP" + ".md", "../" + "shared")
_SKIP_DIRS = {".git", ".venv", "build", "dist", "__pycache__", ".pytest_cache", ".hypothesis"}


def _walk(root: Path) -> list[Path]:
    files = []
    for d, dirs, names in os.walk(root):
        dirs[:] = [x for x in dirs if x not in _SKIP_DIRS and not x.endswith(".egg-info")]
        files += [Path(d) / n for n in names]
    return files


def tracked_files() -> list[Path]:
    """The files git tracks; outside a git checkout (an unpacked sdist), every file
    under the root except build outputs."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return _walk(ROOT)
    return [ROOT / p for p in out.decode().split("\0") if p and (ROOT / p).is_file()]


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


_FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REF_DEF = re.compile(r"^\s{0,3}\[[^\]\n]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)


def relative_links(text: str) -> list[str]:
    """Targets of the inline and reference-style links of markdown ``text`` that are
    paths in the repository (no URL scheme, not a same-page anchor), without anchors;
    code spans and fenced blocks are not links."""
    prose = _INLINE_CODE.sub("", _FENCE.sub("", text))
    targets = _LINK.findall(prose) + _REF_DEF.findall(prose)
    out = []
    for t in targets:
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", t) or t.startswith("#"):
            continue
        out.append(t.split("#", 1)[0].split("?", 1)[0])
    return [t for t in out if t]


def test_link_parser_finds_what_it_must():
    text = ("See [design](docs/design.md#token-layout) and ![gif](docs/x.gif \"t\").\n"
            "[web](https://example.com) [anchor](#top) `[code](not/a/link.md)`\n"
            "```\n[fenced](nor/this.md)\n```\n[ref]: ../other.md\n")
    assert relative_links(text) == ["docs/design.md", "docs/x.gif", "../other.md"]


def test_tracked_files_reference_no_outside_documents():
    files = tracked_files()
    assert ROOT / "README.md" in files and ROOT / "nbp" / "layout.py" in files
    hits = []
    for path in files:
        data = path.read_bytes()
        hits += [f"{path.relative_to(ROOT)}: {word}" for word in FORBIDDEN
                 if word.encode() in data]
    assert not hits, "references to documents that are not in the repository:\n" + "\n".join(hits)


@pytest.mark.parametrize("doc", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files(doc):
    assert doc.is_file(), f"{doc} is missing"
    dead = [t for t in relative_links(doc.read_text(encoding="utf-8"))
            if not (doc.parent / t).exists()]
    assert not dead, f"{doc.relative_to(ROOT)} links to files that do not exist: {dead}"


def test_docs_named_in_tracked_files_exist():
    """Every markdown file under docs/ that a docstring or comment names exists."""
    named = set()
    for path in tracked_files():
        if path.suffix in (".py", ".md", ".cpp", ".cu", ".cuh", ".h", ".c", ".sh", ".toml"):
            named |= set(re.findall(r"\bdocs/[\w.-]+\.md\b", path.read_text(errors="replace")))
    assert "docs/design.md" in named
    missing = sorted(n for n in named if not (ROOT / n).is_file())
    assert not missing, f"docs named in the code but not in the repository: {missing}"
