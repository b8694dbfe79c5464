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


def _cause(e: BaseException) -> tuple[str | None, str]:
    """The file and the one-line cause of a failed write (OSError, safetensors' or a DCP wrapper's error)."""
    failures = getattr(e, "failures", None)  # torch.distributed.checkpoint's CheckpointException
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        return _cause(getattr(inner, "exc", inner))
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
        raise OutputError(io_error_line(e, path)) from None
