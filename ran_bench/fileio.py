"""Atomic file writes, file-system errors as one line, and the git commit every record carries."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from ran_bench.errors import StorageError, os_error_text

REPO = Path(__file__).resolve().parent.parent


@contextmanager
def storage_errors(what: str) -> Iterator[None]:
    """Raise an OSError of the block as a StorageError, "cannot <what>: <cause>" (e.g. "cannot write
    RUN/results.json: Read-only file system"), which ran-bench prints as one error line."""
    try:
        yield
    except StorageError:
        raise
    except OSError as e:
        raise StorageError(f"cannot {what}: {os_error_text(e)}") from e


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs) -> Iterator[IO]:
    """Write `path` through a temporary file in the same folder: on success it is fsynced and
    renamed over `path` (and the folder fsynced); on any error it is removed. A crash or a kill
    leaves the old file or the new one, never half of one. A file system error (read-only, full,
    a file where the folder should be) is raised as a StorageError naming `path`."""
    path = Path(path)
    with storage_errors(f"write {path}"):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with storage_errors(f"write {path}"):
            with os.fdopen(fd, mode, **open_kwargs) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def append_text(path: str | os.PathLike, text: str) -> None:
    """Append `text` to `path` (a log of records); a file system error is a StorageError naming it."""
    with storage_errors(f"write {path}"), open(path, "a") as f:
        f.write(text)


def _fsync_dir(path: Path) -> None:
    """Make a rename durable (the directory entry), where the file system allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def git_commit() -> str:
    """The commit of the ran-bench checkout running this code, with "-dirty" when tracked files
    differ from it. Where git cannot tell (a copy of the checkout without .git, as on a machine
    the code was copied to), the RAN_BENCH_GIT_COMMIT environment variable, set by whoever copied
    it; "unknown" without either."""
    fallback = os.environ.get("RAN_BENCH_GIT_COMMIT", "").strip() or "unknown"
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return fallback
    commit = head.stdout.strip()
    if head.returncode != 0 or not commit:
        return fallback
    return commit + ("-dirty" if status.stdout.strip() else "")


def write_json_atomic(path: str | os.PathLike, data) -> None:
    """`data` as indented JSON with sorted keys, written atomically."""
    with atomic_write(path) as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
