"""Shared test fixtures."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Tests run on CPU with few threads: two cores are shared by torchrun's processes and pytest.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def run_torchrun(args: list[str], nproc: int = 2, timeout: float = 600, env: dict | None = None,
                 cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `torchrun --nproc_per_node nproc ARGS...` on CPU (gloo) and fail the test with its output
    if it exits non-zero. ARGS is e.g. ["-m", "ran_bench", "train", ...] or [script, ...]."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    cmd = [torchrun, "--nproc_per_node", str(nproc), "--master_port", str(_free_port()), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env,
                          cwd=cwd or REPO)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}"
                    f"\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
