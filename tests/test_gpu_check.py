"""The prepared device run: the wheels' chunk round trip (scripts/wheels.py) and the CPU rehearsal of
scripts/gpu_check.sh end to end."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from ran_bench import data
from ran_bench.data.demo import make_demo

REPO = Path(__file__).resolve().parent.parent
WHEELS = [sys.executable, str(REPO / "scripts" / "wheels.py")]


def _wheel(folder: Path, name: str, payload: bytes) -> Path:
    """A minimal pure-Python wheel of package `name` that pip installs, with `payload` as data."""
    path = folder / f"{name}-1.0-py3-none-any.whl"
    info = f"{name}-1.0.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}/__init__.py", "VALUE = 42\n")
        z.writestr(f"{name}/payload.bin", payload)
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*WHEELS, *args], capture_output=True, text=True)


def test_wheels_survive_chunking_and_a_corrupt_or_missing_chunk_is_refused(tmp_path):
    work, store, target = tmp_path / "w", tmp_path / "store", tmp_path / "site"
    (work / "wheels").mkdir(parents=True)
    _wheel(work / "wheels", "rbtiny_a", os.urandom(150_000))  # incompressible: several 64 KiB chunks
    _wheel(work / "wheels", "rbtiny_b", b"b")
    r = _run("split", "--dir", str(work), "--chunk-mib", "0.0625")
    assert r.returncode == 0, r.stderr
    chunks = sorted((work / "chunks").glob("wheels.tar.*"))
    assert len(chunks) >= 3 and all(c.stat().st_size <= 65536 for c in chunks)
    assert "bash scripts/gpu_check.sh" in r.stdout.splitlines()[-1]  # the last chunk travels with the check

    # one call per chunk: stash keeps what came and names what is still missing
    carried = work / "carried" / "chunks"
    carried.mkdir(parents=True)
    (carried / "manifest.json").write_bytes((work / "chunks" / "manifest.json").read_bytes())
    (carried / chunks[0].name).write_bytes(chunks[0].read_bytes())
    r = _run("stash", "--dir", str(work / "carried"), "--store", str(store))
    assert r.returncode == 0 and chunks[1].name in r.stdout and chunks[0].name not in r.stdout.split(":")[-1]
    r = _run("install", "--dir", str(work / "carried"), "--store", str(store), "--target", str(target))
    assert r.returncode == 2 and r.stderr.startswith("error:") and chunks[1].name in r.stderr

    r = _run("install", "--dir", str(work), "--store", str(store), "--target", str(target))
    assert r.returncode == 0, r.stderr
    out = subprocess.run([sys.executable, "-c", "import rbtiny_a, rbtiny_b; print(rbtiny_a.VALUE)"],
                         env={**os.environ, "PYTHONPATH": str(target)}, capture_output=True, text=True)
    assert out.stdout.strip() == "42", out.stderr
    assert (target / "rbtiny_a" / "payload.bin").read_bytes() == \
        zipfile.ZipFile(next((work / "wheels").glob("rbtiny_a-*"))).read("rbtiny_a/payload.bin")

    # a chunk damaged in the store (one byte) is refused before anything is joined or installed
    bad = store / chunks[1].name
    blob = bytearray(bad.read_bytes())
    blob[100] ^= 0xFF
    bad.write_bytes(bytes(blob))
    r = _run("install", "--dir", str(work / "carried"), "--store", str(store), "--target", str(tmp_path / "t2"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert f"{bad} is corrupt" in r.stderr and not (tmp_path / "t2").exists()


def test_split_refuses_two_versions_of_one_package(tmp_path):
    (tmp_path / "wheels").mkdir()
    _wheel(tmp_path / "wheels", "rbtiny", b"x").rename(tmp_path / "wheels" / "rbtiny-0.9-py3-none-any.whl")
    _wheel(tmp_path / "wheels", "rbtiny", b"y")
    r = _run("split", "--dir", str(tmp_path))
    assert r.returncode == 2 and "two versions of rbtiny" in r.stderr


def test_make_demo_writes_the_same_images_with_several_workers(tmp_path):
    kw = dict(seed=4, num_classes=2, train_per_class=5, val_per_class=3, min_side=30, max_side=40)
    make_demo(tmp_path / "one", **kw)
    make_demo(tmp_path / "two", workers=2, **kw)
    one = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*.JPEG"))
    assert len(one) == 16
    assert one == sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*.JPEG"))
    assert all((tmp_path / "one" / p).read_bytes() == (tmp_path / "two" / p).read_bytes() for p in one)


@pytest.mark.slow
@pytest.mark.skipif(not data.dali_available(), reason="NVIDIA DALI is not installed")
def test_gpu_check_rehearsal_runs_every_part_on_the_cpu(tmp_path):
    """scripts/gpu_check.sh with GPU_CHECK_CPU=1: train, SIGTERM to the process group (exit 75),
    resume, exact evaluation and the five bench rows, at tiny sizes with DALI's CPU decoder."""
    out = tmp_path / "out"
    env = {**os.environ, "GPU_CHECK_CPU": "1", "PYTHON": sys.executable, "GPU_CHECK_WORK": str(tmp_path / "work")}
    r = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), str(out)], env=env, capture_output=True,
                       text=True, timeout=1200)
    log = (out / "gpu_check.log").read_text()
    assert r.returncode == 0, log[-3000:]
    assert "ok: exit 75, checkpoint of step" in log and "all checks passed (cpu)" in log
    assert sorted(p.name for p in out.iterdir()) == ["bench.md", "gpu_check.log", "metrics.jsonl", "results.csv",
                                                     "results.json", "summary.txt", "train.log"]
    assert len((out / "summary.txt").read_text().splitlines()) == 6  # header + five rows
