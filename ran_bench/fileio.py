"""Atomic file writes and the provenance facts every record carries (git commit, device name)."""

from __future__ import annotations

import os
import platform
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

import torch

REPO = Path(__file__).resolve().parent.parent


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs) -> Iterator[IO]:
    """Write `path` through a temporary file in the same folder: on success it is fsynced and
    renamed over `path` (and the folder fsynced); on any error it is removed. A crash or a kill
    leaves the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


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


def device_name(device: torch.device) -> str:
    """GPU name on CUDA, the CPU model otherwise."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"
