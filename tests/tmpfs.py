"""Real small and read-only file systems for the storage-error tests: a tmpfs mounted on a folder.

Mounting needs root (the development machine and CI run the tests as root); elsewhere the tests
that need it are skipped with the reason.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

PAGE = 4096  # tmpfs allocates whole pages


@contextmanager
def tmpfs(path: Path, size: int) -> Iterator[Path]:
    """A tmpfs of `size` bytes (rounded up to pages) mounted on the new folder `path`."""
    path.mkdir(parents=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={-(-size // PAGE) * PAGE}", "tmpfs", str(path)],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {mount.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def remount(path: Path, option: str) -> None:
    """Change a mounted tmpfs: "ro" (read-only), "rw", or "size=N"."""
    subprocess.run(["mount", "-o", f"remount,{option}", str(path)], check=True)


def free_bytes(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize
