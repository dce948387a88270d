"""The files of a training run's ``out_dir``, written so that a crash or a full disk cannot block it.

* ``log.jsonl`` grows by one ``os.write`` per record; a write cut short (disk
  full) is truncated back, and a torn last line left by a killed process is
  dropped when the run resumes.
* ``model/`` (the loadable native dir written with every checkpoint) is built
  in a temporary sibling and swapped in, so it is always a complete model.
* Temporary files of our own naming (``.checkpoint.tmp.*.pt``...) left by a
  killed write are removed when a run starts.
* Every ``OSError`` surfaces as one ``WriteError`` line naming the file.
"""
from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Callable

from ..io import atomic_write_text
from .checkpoint import explain_write_errors

__all__ = ["append_log", "truncate_log", "read_log", "export_dir", "clean_stale_temps",
           "write_text"]


def write_text(path: Path, text: str) -> None:
    """``atomic_write_text`` whose failures name the file."""
    with explain_write_errors(path):
        atomic_write_text(path, text)


def append_log(path: Path, record: dict) -> None:
    """Append one JSON line; a partial write is cut back so no torn line stays behind."""
    line = (json.dumps(record) + "\n").encode()
    with explain_write_errors(path):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            start = os.fstat(fd).st_size
            try:
                written = os.write(fd, line)
            except OSError:
                os.ftruncate(fd, start)
                raise
            if written != len(line):  # a short write: the disk filled up mid-line
                os.ftruncate(fd, start)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        finally:
            os.close(fd)


def read_log(path: Path) -> list[dict]:
    """The records of a log; a torn last line (a killed or failed write) is skipped.

    Any other unreadable line is a ValueError naming the file and line number.
    """
    if not path.exists():
        return []
    lines = path.read_text(errors="replace").splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
                raise ValueError("not a record with an integer 'step'")
        except ValueError as e:
            if i == len(lines) - 1:
                break  # torn by a write that did not finish
            raise ValueError(f"log: {str(path)!r} line {i + 1} is not a log record ({e}); "
                             f"fix or delete that line") from None
        records.append(rec)
    return records


def truncate_log(path: Path, step: int) -> None:
    """Keep the records of steps <= ``step`` (a resumed run rewrites what follows)."""
    if path.exists():
        keep = [r for r in read_log(path) if r["step"] <= step]
        write_text(path, "".join(json.dumps(r) + "\n" for r in keep))


def _temp_name(name: str, kind: str) -> str:
    return f".{name}.{kind}.{secrets.token_hex(4)}"


def export_dir(write: Callable[[Path], None], final: Path) -> None:
    """Build a directory with ``write(tmp_dir)`` and swap it in as ``final`` (complete or old)."""
    tmp = final.parent / _temp_name(final.name, "tmp")
    old = final.parent / _temp_name(final.name, "old")
    with explain_write_errors(final):
        os.mkdir(tmp)  # mode 0o777 less the umask, like any directory
        try:
            write(tmp)
            if final.exists():
                os.rename(final, old)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def clean_stale_temps(out_dir: Path, file_names: tuple[str, ...], dir_name: str) -> list[Path]:
    """Remove the temporaries a killed run left in ``out_dir``; returns what was removed.

    Files: ``atomic_path``'s ``.{stem}.tmp.*{suffix}`` of each of ``file_names``.
    Directories: ``export_dir``'s ``.{dir_name}.tmp.*``; a ``.{dir_name}.old.*``
    is put back when the swap was cut between its two renames.
    """
    if not out_dir.is_dir():
        return []
    removed = []
    for name in file_names:
        stem, suffix = os.path.splitext(name)
        for p in out_dir.glob(f".{stem}.tmp.*{suffix}"):
            if p.is_file() and not p.is_symlink():
                p.unlink()
                removed.append(p)
    for p in out_dir.glob(f".{dir_name}.tmp.*"):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
            removed.append(p)
    olds = sorted(p for p in out_dir.glob(f".{dir_name}.old.*") if p.is_dir())
    final = out_dir / dir_name
    if olds and not final.exists():
        os.rename(olds.pop(), final)
    for p in olds:
        shutil.rmtree(p)
        removed.append(p)
    return removed
