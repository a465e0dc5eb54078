"""Output files that never exist half-written.

Every writer goes through :func:`atomic_output`: data lands in a uniquely named
temporary file beside the target (so concurrent ``make -j`` stages never collide and the
final rename stays on one filesystem), is fsynced, and is renamed over the target only
when the writer finished without error.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from weightless_cli.errors import BadInputError, UsageError


def check_writable(path: str | os.PathLike, force: bool) -> Path:
    """Refuse to clobber an existing output unless ``force``; fail early on a missing folder."""
    target = Path(path)
    if target.is_dir():
        raise UsageError("is a directory", target)
    if target.exists() and not force:
        raise UsageError("already exists; use -f/--force to overwrite", target)
    if not target.parent.exists():
        raise BadInputError("output folder does not exist", target.parent)
    return target


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; rename it to ``path`` only on success."""
    target = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        # mkstemp creates 0600; give the output the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)


@contextlib.contextmanager
def _input_errors(path: str | os.PathLike) -> Iterator[None]:
    """Turn OS errors about an input file into one-line user errors."""
    try:
        yield
    except FileNotFoundError:
        raise BadInputError("no such file", path) from None
    except IsADirectoryError:
        raise BadInputError("is a directory, expected a file", path) from None
    except OSError as exc:
        raise BadInputError(f"cannot read: {exc.strerror}", path) from None


def read_input_bytes(path: str | os.PathLike) -> bytes:
    """Read a whole input file, turning OS errors into one-line user errors."""
    with _input_errors(path):
        return Path(path).read_bytes()


def check_readable(path: str | os.PathLike) -> Path:
    """Fail early, in one line, on an input that is missing or unreadable, without reading it."""
    with _input_errors(path), open(path, "rb"):
        return Path(path)
