"""Files: the cache root, and writes that a crash never leaves half-written (temp, then rename)."""

from __future__ import annotations

import os
import pathlib
import secrets
from collections.abc import Callable
from typing import BinaryIO


def atomic_write(path: pathlib.Path, write: Callable[[BinaryIO], object]) -> None:
    """Calls write(f) on a new temp file beside path, syncs it, renames it to path.

    On any failure the temp file is removed, path is left as it was, and the error is raised.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: pathlib.Path, text: str) -> None:
    """Writes text (UTF-8) to path atomically."""
    atomic_write(path, lambda f: f.write(text.encode()))


def cache_dir() -> pathlib.Path:
    """Cache root: env ``CNN_CACHE_DIR``, else ``~/.cache/cnn``."""
    env = os.environ.get("CNN_CACHE_DIR")
    return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "cnn"
