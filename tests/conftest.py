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
    from ran_bench.runtime import free_port  # after OMP_NUM_THREADS is set above: it imports torch

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    cmd = [torchrun, "--nproc_per_node", str(nproc), "--master_port", str(free_port()), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env,
                          cwd=cwd or REPO)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}"
                    f"\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def make_checkpoint(step: int, model: dict | None = None, **fields):
    """A complete `Checkpoint` of `step` with small plain values (a 3->2 linear model's states by
    default); `fields` replace any of them."""
    import torch

    from ran_bench.checkpoint import Checkpoint
    from ran_bench.config import load_config, to_yaml

    linear = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(linear.parameters(), lr=0.1, momentum=0.9)
    linear(torch.ones(1, 3)).sum().backward()
    opt.step()
    defaults = dict(
        step=step, epoch=0, epochs=0.5, images_seen=16 * step, world_size=1, num_classes=2, params=8, macs=6,
        macs_input_size=32, device_type="cpu", device_name="test CPU", precision="fp32", elapsed_s=1.0,
        device_seconds=1.0, train_images=16 * step, train_seconds=0.5, skipped_files=[],
        model=model if model is not None else linear.state_dict(), optimizer=opt.state_dict(),
        scheduler={"last_epoch": step}, scaler=None,
        ranks=[{"data": {"epoch": 1, "batches": 7, "backend": "torchvision"}}],
        config=to_yaml(load_config(None, ["model.name=attention56"])))
    return Checkpoint(**{**defaults, **fields})
