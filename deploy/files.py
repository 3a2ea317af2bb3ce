"""Atomic file writes: a reader (a coordinator, a resumed run) sees the old file or the complete new one, never half.

The one place that does it; placements, routing statistics, results, checkpoints and ONNX exports all write
through :func:`atomic_path` or :func:`atomic_write`.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "atomic_write", "fsync_dir"]


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """Make a rename in ``folder`` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without an exception it replaces ``path``.

    For writers that take a file name (safetensors, onnx). On an exception the temporary file is removed and
    ``path`` is untouched. ``durable`` also fsyncs the folder after the rename (results that must survive a power
    cut); the caller fsyncs the file's own data if it needs to.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # A fresh unique name the writer creates itself, so the file gets the usual permissions (mkstemp's are 0600).
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    if durable:
        fsync_dir(target.parent)


def atomic_write(path: str | os.PathLike[str], data: bytes | str, *, durable: bool = False) -> Path:
    """Write ``data`` (text is UTF-8) to ``path`` atomically; ``durable`` fsyncs the data and the folder."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    try:
        with atomic_path(path, durable=durable) as tmp:
            with open(tmp, "wb") as f:
                f.write(payload)
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
    except OSError as e:  # a full disk or a quota: the temporary file is gone (atomic_path); name the file meant
        raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}") from None
    return Path(path)
