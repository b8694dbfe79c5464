"""Failed writes as one line: a disk full, read-only or permission-denied write becomes an OutputError
naming the file and the cause (errno name included), never a traceback. Every writer of nestlm
(checkpoints, training checkpoints, reports) writes inside ``writing(path)``.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

from .errors import NestlmError, OutputError


def _wrapped(e: BaseException) -> BaseException | None:
    """The first rank's exception inside torch.distributed.checkpoint's CheckpointException, else None."""
    failures = getattr(e, "failures", None)  # {rank: (exception, stack summary)}
    if not isinstance(failures, dict) or not failures:
        return None
    inner = next(iter(failures.values()))
    inner = inner[0] if isinstance(inner, tuple) and inner else getattr(inner, "exc", inner)
    return inner if isinstance(inner, BaseException) else None


def _cause(e: BaseException) -> tuple[str | None, str]:
    """The file and the one-line cause of a failed write (OSError, safetensors' or a DCP wrapper's error)."""
    inner = _wrapped(e)
    if inner is not None:
        return _cause(inner)
    if isinstance(e, OSError):
        name = errno.errorcode.get(e.errno or 0, "")
        return e.filename, f"{e.strerror or e}{f' ({name})' if name else ''}"
    msg = str(e)
    for code, name in errno.errorcode.items():  # safetensors' Rust IoError: "... code: 28, kind: StorageFull ..."
        if f"code: {code}," in msg:
            return None, f"{os.strerror(code)} ({name})"
    return None, msg.splitlines()[0] if msg else type(e).__name__


def _nearly_full(path: str | os.PathLike | None) -> bool:
    """Whether the filesystem of ``path`` (or its nearest existing parent) has under 64 MiB free."""
    p = Path(path or "/")
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free < 64 << 20


def io_error_line(e: BaseException, path: str | os.PathLike | None = None) -> str:
    """The one line for a failed write: 'cannot write FILE: CAUSE'."""
    f, cause = _cause(e)
    if "(E" not in cause and _nearly_full(f or path):  # torch.save's writer reports a full disk as a bad position
        cause = f"{os.strerror(errno.ENOSPC)} (ENOSPC; the writer said: {cause})"
    return f"cannot write {f or path or 'the output'}: {cause}"


@contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turn a failed write under ``path`` (disk full, read-only, permission denied) into one OutputError line."""
    try:
        yield
    except NestlmError:
        raise
    except (OSError, SafetensorError) as e:
        raise OutputError(io_error_line(e, path)) from None
    except BaseException as e:  # torch.distributed.checkpoint wraps a rank's error in a BaseException
        if type(e).__name__ != "CheckpointException":
            raise
        inner = _wrapped(e)
        if inner is not None and not isinstance(inner, Exception):  # Ctrl-C or a signal mid-write: not an I/O error
            raise inner from None
        raise OutputError(io_error_line(e, path)) from None
