"""Exact evaluation across 2 torchrun processes: every validation image counted exactly once."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import pytest

from conftest import run_torchrun

BATCH = 4


def _records(root: str, backend: str, rank: int, world_size: int) -> list[list]:
    """(label, digest of the image's pixels) of every sample this rank evaluates."""
    from ran_bench.data import build_loader

    out = []
    ld = build_loader(root, "val", size=24, batch_size=BATCH, backend=backend, rank=rank,
                      world_size=world_size, num_threads=1)
    for x, y in ld:
        for img, label in zip(x, y.tolist()):
            out.append([label, hashlib.sha1(img.contiguous().numpy().tobytes()).hexdigest()])
    assert len(out) == ld.num_samples
    return out


def _worker(root: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    assert dist.get_world_size() == 2, f"expected 2 processes, got {dist.get_world_size()}"
    rank = dist.get_rank()
    from ran_bench.data import dali_available

    backends = ["torchvision"] + (["dali"] if dali_available() else [])
    result = {b: _records(root, b, rank, 2) for b in backends}
    gathered = [None, None]
    dist.all_gather_object(gathered, result)
    if rank == 0:
        Path(out_dir, "ranks.json").write_text(json.dumps(gathered))
    dist.destroy_process_group()


@pytest.mark.dist
@pytest.mark.slow  # ~15 s alone; two fresh interpreters importing torch and DALI
def test_exact_eval_on_two_processes(tmp_path):
    from ran_bench.data import dali_available
    from ran_bench.data.demo import make_demo

    root = tmp_path / "d"
    # 3 x 7 = 21 val images: not a multiple of world size x batch size = 8
    make_demo(root, seed=4, num_classes=3, train_per_class=1, val_per_class=7, min_side=28, max_side=40)
    run_torchrun([__file__, str(root), str(tmp_path)], nproc=2)
    ranks = json.loads((tmp_path / "ranks.json").read_text())
    for backend in ["torchvision"] + (["dali"] if dali_available() else []):
        per_rank = [r[backend] for r in ranks]
        assert [len(r) for r in per_rank] == [10, 11]  # unpadded: the ranks differ by one image
        single = _records(str(root), backend, 0, 1)
        assert len(single) == 21
        assert sorted(map(tuple, per_rank[0] + per_rank[1])) == sorted(map(tuple, single))
        assert len({d for _, d in single}) == 21  # the digests do tell the images apart


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _worker(sys.argv[1], sys.argv[2])
