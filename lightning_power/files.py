"""Atomic file writes: a temporary file in the target folder, then ``os.replace``; a reader or a crash never sees a
partial file. Every file the package writes (snapshots, masks, tables, JSON, figures) goes through here."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Create or replace ``path`` with what ``write`` writes to a binary file object, atomically.

    On any failure (an unwritable folder, a full disk, an error in ``write``) the temporary file is removed and an
    ``OSError`` naming ``path`` is raised, chained to the cause; an existing ``path`` is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Mode 0666 under the process umask, as open() gives; O_EXCL: never an existing file.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    except OSError as error:
        raise OSError(f"cannot write {str(path)!r}: {error}") from error
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise OSError(f"cannot write {str(path)!r}: {error}") from error
        raise
    return path


def write_atomically(path: str | os.PathLike, data: str | bytes) -> Path:
    """Create or replace ``path`` with ``data`` (text is UTF-8 encoded), atomically."""
    payload = data.encode() if isinstance(data, str) else data
    return atomic_write(path, lambda f: f.write(payload))


def save_png(figure: Any, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Write a matplotlib figure as a PNG, atomically."""
    return atomic_write(path, lambda f: figure.savefig(f, format="png", dpi=dpi, bbox_inches="tight"))
