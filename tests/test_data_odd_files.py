"""Odd files through every backend, the way users meet them.

DALI 2.4's decoders crash the process (segfault, no message) on a header they cannot parse: a
text file, a GIF or an empty file named .JPEG, random bytes, a damaged JPEG or PNG header. Each
must instead be replaced by a flat image, logged and counted, by the loader and by `ran-bench
train` / `ran-bench eval`; a file that cannot be read must stop a run with one `error:` line.
The crash is not certain on any one pass (about half of them), so the loader test runs each kind
through several pipelines in a child process, where a crash is an exit status, not a lost session.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, run_torchrun
from ran_bench import data
from ran_bench.data import build_loader, list_samples
from ran_bench.data.demo import make_demo

needs_dali = pytest.mark.skipif(not data.dali_available(), reason="NVIDIA DALI is not installed")
ALL = [pytest.param("dali", marks=needs_dali), "torchvision"]
ENTRY = str(REPO / "tests" / "tiny_model.py")  # the ran-bench CLI with the tiny test model registered
KINDS = ("text", "gif", "empty", "random", "jpeg_marker", "png_header")
CLI_KINDS = ("text", "gif", "empty")  # the ones real ImageNet copies were found to hold


def odd_bytes(kind: str) -> bytes:
    """The bytes of a file named .JPEG whose header DALI 2.4's decoders cannot parse."""
    rng = np.random.default_rng(0)
    gif, png = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (24, 24), (200, 10, 10)).save(gif, "GIF")
    Image.new("RGB", (24, 24), (200, 10, 10)).save(png, "PNG")
    return {"text": b"not an image\n", "gif": gif.getvalue(), "empty": b"", "random": rng.bytes(3000),
            "jpeg_marker": b"\xff\xd8" + rng.bytes(3000), "png_header": png.getvalue()[:30]}[kind]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO / "tests")}


# -- the loaders -------------------------------------------------------------------------------
def _each_kind_through_the_loaders(base: str, backend: str) -> None:
    """Child process: each kind amid 63 demo images, one validation pass and two training epochs
    (batch 32, 2 decoding threads); every sample counted, the bad file the only one replaced (none
    for a GIF with torchvision: PIL decodes it)."""
    for kind in KINDS:
        root = Path(base) / kind
        make_demo(root, num_classes=2, train_per_class=32, val_per_class=32, min_side=24, max_side=40)
        for split in ("val", "train"):
            files, _, _ = list_samples(root, split)
            Path(files[40]).write_bytes(odd_bytes(kind))
            ld = build_loader(root, split, size=24, batch_size=32, backend=backend, num_threads=2, seed=1)
            for epoch in range(1 if split == "val" else 2):
                ld.set_epoch(epoch)
                assert sum(len(y) for _, y in ld) == 64, (kind, split)
            replaced = [] if kind == "gif" and backend == "torchvision" else [files[40]]
            assert ld.bad_files == replaced, (kind, split, ld.bad_files)
            print(kind, split, "ok", flush=True)


@pytest.mark.parametrize("backend", ALL)
def test_each_odd_kind_is_replaced_and_the_process_survives(tmp_path, backend):
    code = f"import test_data_odd_files as t; t._each_kind_through_the_loaders({str(tmp_path)!r}, {backend!r})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode} (-11: segfault)\n{proc.stdout}\n{proc.stderr[-3000:]}"
    assert proc.stdout.count(" ok") == 2 * len(KINDS)


# -- the commands --------------------------------------------------------------------------------
CONFIG = """
model: {{name: test_tiny_net}}
data: {{name: odd, root: {root}, backend: {backend}, train_size: 32, test_sizes: [32], num_threads: 2}}
optim: {{global_batch_size: 19, per_device_batch_size: 19, lr_per_256: 1.0}}
schedule: {{reference_batch_size: 19, total_steps: 2, milestones: []}}
checkpoint: {{every_steps: 2, keep_last: 1}}
eval: {{every_steps: 0, batch_size: 8}}
log: {{every_steps: 1}}
"""


@pytest.fixture(scope="module")
def odd_root(tmp_path_factory) -> tuple[Path, dict[str, list[str]]]:
    """16 train + 8 val demo images, and a text file, a GIF and an empty file named .JPEG in
    train/circle and val/circle: one step of 19 = one epoch holds all three."""
    root = tmp_path_factory.mktemp("odd") / "d"
    make_demo(root, num_classes=2, train_per_class=8, val_per_class=4, min_side=24, max_side=40)
    paths: dict[str, list[str]] = {}
    for split in ("train", "val"):
        for kind in CLI_KINDS:
            path = root / split / "circle" / f"zz_{kind}.JPEG"
            path.write_bytes(odd_bytes(kind))
            paths.setdefault(split, []).append(str(path))
    return root, paths


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, ENTRY, *map(str, args)], capture_output=True, text=True, env=_env(),
                          cwd=REPO, timeout=600)


@pytest.fixture(scope="module", params=ALL)
def trained(request, odd_root, tmp_path_factory) -> tuple[str, Path, subprocess.CompletedProcess]:
    """`ran-bench train` over the odd folder with each backend: (backend, run directory, process)."""
    backend = request.param
    base = tmp_path_factory.mktemp(f"run_{backend}")
    (base / "config.yaml").write_text(CONFIG.format(root=odd_root[0], backend=backend))
    return backend, base / "run", _cli("train", "--config", base / "config.yaml", "--run-dir", base / "run")


def _replaced(backend: str, paths: list[str]) -> list[str]:
    """The odd files a backend replaces: all three with DALI, all but the GIF with torchvision (PIL reads GIF)."""
    return [p for p in paths if backend == "dali" or not p.endswith("zz_gif.JPEG")]


def test_train_logs_counts_and_goes_on_past_odd_files(trained, odd_root):
    backend, run, proc = trained
    assert proc.returncode == 0, f"exit {proc.returncode} (-11: segfault)\n{proc.stderr[-4000:]}"
    _, paths = odd_root
    results = json.loads((run / "results.json").read_text())
    log = (run / "train.log").read_text()
    for split in ("train", "val"):
        for path in paths[split]:
            logged = f"replaced by a flat mean-colour image: {path}" in log
            assert logged == (path in _replaced(backend, paths[split])), path
    assert results["steps"] == 2 and results["skipped_images"] == len(_replaced(backend, paths["train"]))
    evaluation = results["evaluations"][0]
    assert (evaluation["num_samples"], evaluation["skipped_images"]) == (11, len(_replaced(backend, paths["val"])))


def test_eval_logs_counts_and_goes_on_past_odd_files(trained, odd_root):
    backend, run, train = trained
    assert train.returncode == 0, train.stderr[-4000:]
    proc = _cli("eval", run)
    assert proc.returncode == 0, f"exit {proc.returncode} (-11: segfault)\n{proc.stderr[-4000:]}"
    bad = _replaced(backend, odd_root[1]["val"])
    assert f"over 11 images, {len(bad)} unreadable" in proc.stdout
    for path in bad:
        assert f"replaced by a flat mean-colour image: {path}" in proc.stderr
    assert json.loads((run / "results.json").read_text())["evaluations"][0]["skipped_images"] == len(bad)


@needs_dali
@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("trained", ["dali"], indirect=True)
def test_dali_eval_in_two_processes_of_one_image(trained, tmp_path):
    """`torchrun --nproc_per_node 2 ... eval` with DALI on a validation set of one image: rank 0
    reads nothing, rank 1 the image (DALI's reader refuses more shards than files)."""
    _, run, train = trained
    assert train.returncode == 0, train.stderr[-4000:]
    one = tmp_path / "one"
    make_demo(one, num_classes=2, train_per_class=1, val_per_class=1, min_side=24, max_side=40)
    os.remove(list_samples(one, "val")[0][0])
    proc = run_torchrun([ENTRY, "eval", str(run), f"data.root={one}"], env={"PYTHONPATH": str(REPO / "tests")})
    assert "over 1 images" in proc.stdout


@pytest.mark.parametrize("backend", ALL)
def test_an_unreadable_file_stops_train_with_one_error_line(odd_root, tmp_path, backend):
    """A file every read of which fails (EIO; a symlink to /proc/self/mem, since chmod stops no
    read as root) ends `ran-bench train` with exit 2 and one line naming it, no traceback."""
    root = tmp_path / "d"
    shutil.copytree(odd_root[0], root, symlinks=True)
    bad = list_samples(root, "train")[0][3]
    os.remove(bad)
    os.symlink("/proc/self/mem", bad)
    (tmp_path / "config.yaml").write_text(CONFIG.format(root=root, backend=backend))
    proc = _cli("train", "--config", tmp_path / "config.yaml", "--run-dir", tmp_path / "run")
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr[-4000:]}"
    assert "Traceback" not in proc.stderr
    assert proc.stderr.rstrip().splitlines()[-1].startswith(
        f"error: cannot read {bad} (Input/output error): a file-system fault, not a bad image;")
