#!/usr/bin/env python3
"""Carry the Python packages a GPU machine lacks onto it in chunks, and install them there.

The device machine of this workplace has no package registry and takes at most 64 MiB of ignored
files per call, while DALI for CUDA 13 with its codec libraries is about 250 MiB of wheels. So:

  here:   python scripts/wheels.py download      # pip download the pinned wheels into .gpu_wheels/wheels
          python scripts/wheels.py split         # one tar cut into chunks + manifest.json (sha256 of each)
  there:  python3 scripts/wheels.py stash        # one call per chunk: check it, keep it in --store
          python3 scripts/wheels.py install      # all chunks checked, joined, every wheel checked, pip install
                                                 # (scripts/gpu_check.sh runs it; its call carries the last chunk)

`split` prints the chunk list and the calls to make. A chunk that is missing or whose sha256 does
not match the manifest stops `stash` and `install` with one `error:` line (exit 2). Standard
library only: it runs under any Python 3.10+.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DIR = REPO / ".gpu_wheels"  # ignored by git (.gitignore); `carry` takes paths under it
STORE = Path("/var/tmp/ran_bench_wheels")  # outside the checkout: kept between calls on a warm machine
TARGET = Path("/var/tmp/ran_bench_site")
ARCHIVE = "wheels.tar"
CHUNK_MIB = 58  # a chunk, the manifest and the rest of the working tree stay under a call's 64 MiB
# Python 3.12, manylinux x86_64: what ran-bench imports that the device image (its list in
# /work/.library/device/KINDS.md) lacks, with the dependencies of these that it lacks too.
WHEELS = (
    "nvidia-dali-cuda130==2.4.0",
    "nvidia-nvimgcodec-cu13==0.9.0.20",
    "nvidia-libnvcomp-cu13==5.3.0.16",
    "nvidia-nvjpeg==13.0.4.44",  # the CUDA 13.0 series, as the device's torch 2.11+cu130
    "nvidia-nvjpeg2k-cu13==0.11.0.51",
    "nvidia-nvtiff-cu13==0.8.0.82",
    "astunparse==1.6.3",
    "gast==0.7.0",
    "optree==0.20.0",
    "nvtx==0.2.17",
    "makefun==1.16.0",
    "libcst==1.9.0",
    "omegaconf==2.3.0",
    "submitit==1.5.4",
)
# Pure-Python packages published as source only: built into a py3-none-any wheel here.
SOURCE_ONLY = ("antlr4-python3-runtime==4.9.3",)  # omegaconf 2.3 needs 4.9.*
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")


class WheelsError(Exception):
    """Bad input or a failed check: one `error:` line, exit 2."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download(wheel_dir: Path, specs: tuple[str, ...] = WHEELS, sources: tuple[str, ...] = SOURCE_ONLY) -> list[Path]:
    """`pip download` the wheels for CPython 3.12 on manylinux x86_64, without dependencies (each
    one needed is pinned in `specs`), into `wheel_dir`; `sources` are built into pure-Python wheels."""
    wheel_dir.mkdir(parents=True, exist_ok=True)
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    pip = [sys.executable, "-m", "pip"]
    for cmd, what in (([*pip, "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
                        "--implementation", "cp", *platforms, "-d", str(wheel_dir), *specs], specs),
                      ([*pip, "wheel", "--no-deps", "-w", str(wheel_dir), *sources], sources)):
        if what and subprocess.run(cmd).returncode != 0:
            raise WheelsError(f"pip could not fetch some of {' '.join(what)} (see pip's message above)")
    return sorted(wheel_dir.glob("*.whl"))


def split(wheel_dir: Path, chunk_dir: Path, chunk_bytes: int) -> dict:
    """Tar every wheel of `wheel_dir`, cut the tar into `chunk_dir/wheels.tar.NNN` of at most
    `chunk_bytes`, and write `chunk_dir/manifest.json` (sha256 of each wheel, chunk and the tar)."""
    wheels = sorted(wheel_dir.glob("*.whl"))
    if not wheels:
        raise WheelsError(f"no wheels in {wheel_dir}: run `python scripts/wheels.py download` first")
    names = {}
    for w in wheels:  # two versions of one package would stop pip's whole install there
        key = w.name.split("-")[0].lower().replace("_", "-")
        if key in names:
            raise WheelsError(f"{wheel_dir} holds two versions of {key}: {names[key]} and {w.name}; delete one")
        names[key] = w.name
    if chunk_dir.exists():
        shutil.rmtree(chunk_dir)
    chunk_dir.mkdir(parents=True)
    archive = chunk_dir / ARCHIVE
    with tarfile.open(archive, "w") as tar:
        for w in wheels:
            tar.add(w, arcname=w.name)
    chunks = []
    with open(archive, "rb") as f:
        for i, block in enumerate(iter(lambda: f.read(chunk_bytes), b"")):
            part = chunk_dir / f"{ARCHIVE}.{i:03d}"
            part.write_bytes(block)
            chunks.append({"name": part.name, "bytes": len(block), "sha256": hashlib.sha256(block).hexdigest()})
    manifest = {"archive": ARCHIVE, "bytes": archive.stat().st_size, "sha256": sha256(archive), "chunks": chunks,
                "wheels": [{"name": w.name, "sha256": sha256(w)} for w in wheels]}
    archive.unlink()
    (chunk_dir / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def read_manifest(chunk_dir: Path) -> dict:
    path = chunk_dir / "manifest.json"
    if not path.is_file():
        raise WheelsError(f"{path} is missing: carry it with every chunk (run `split` here first)")
    return json.loads(path.read_text())


def check_chunk(path: Path, entry: dict) -> None:
    """Raise WheelsError unless `path` has the size and sha256 the manifest gives."""
    size = path.stat().st_size
    if size != entry["bytes"] or sha256(path) != entry["sha256"]:
        raise WheelsError(f"{path} is corrupt: {size} bytes, sha256 {sha256(path)[:16]}..., but the manifest "
                          f"says {entry['bytes']} bytes, sha256 {entry['sha256'][:16]}...; carry it again")


def stash(chunk_dir: Path, store: Path) -> list[str]:
    """Copy the chunks present in `chunk_dir` (and the manifest) into `store` after checking them;
    returns the names of the chunks `store` still lacks."""
    manifest = read_manifest(chunk_dir)
    store.mkdir(parents=True, exist_ok=True)
    kept = store / "manifest.json"
    if kept.is_file() and json.loads(kept.read_text())["sha256"] != manifest["sha256"]:
        for old in store.glob(f"{ARCHIVE}.*"):  # chunks of another split: useless with this one
            old.unlink()
    shutil.copyfile(chunk_dir / "manifest.json", kept)
    for entry in manifest["chunks"]:
        src = chunk_dir / entry["name"]
        if src.is_file():
            check_chunk(src, entry)
            tmp = store / (entry["name"] + ".tmp")
            shutil.copyfile(src, tmp)
            os.replace(tmp, store / entry["name"])
    return [e["name"] for e in manifest["chunks"] if not (store / e["name"]).is_file()]


def reassemble(store: Path, out_dir: Path) -> list[Path]:
    """Check every chunk in `store`, join them, check the tar, and extract the wheels (each
    checked) into `out_dir`."""
    manifest = read_manifest(store)
    missing = [e["name"] for e in manifest["chunks"] if not (store / e["name"]).is_file()]
    if missing:
        raise WheelsError(f"{len(missing)} of {len(manifest['chunks'])} chunks are not in {store}: "
                          f"{', '.join(missing)}; carry them (and stash) first")
    out_dir.mkdir(parents=True, exist_ok=True)
    archive = out_dir / manifest["archive"]
    with open(archive, "wb") as out:
        for entry in manifest["chunks"]:
            check_chunk(store / entry["name"], entry)
            with open(store / entry["name"], "rb") as f:
                shutil.copyfileobj(f, out)
    if sha256(archive) != manifest["sha256"]:
        raise WheelsError(f"the joined {archive} does not match the manifest's sha256")
    with tarfile.open(archive) as tar:
        tar.extractall(out_dir, filter="data")
    archive.unlink()
    wheels = []
    for entry in manifest["wheels"]:
        path = out_dir / entry["name"]
        if not path.is_file() or sha256(path) != entry["sha256"]:
            raise WheelsError(f"{path} is missing or does not match the manifest's sha256")
        wheels.append(path)
    return wheels


def install(store: Path, target: Path, python: str) -> None:
    """Reassemble the wheels and pip install them, offline and without dependencies, into `target`."""
    with tempfile.TemporaryDirectory(prefix="ran_bench_wheels_") as tmp:
        wheels = reassemble(store, Path(tmp))
        cmd = [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
               "--disable-pip-version-check", "--upgrade", "--target", str(target), *map(str, wheels)]
        if subprocess.run(cmd).returncode != 0:
            raise WheelsError(f"pip install of {len(wheels)} wheels into {target} failed (see pip's message above)")
    print(f"installed {len(wheels)} wheels into {target}: export PYTHONPATH={target}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    for name, text in (("download", "pip download the pinned wheels into DIR/wheels (here)"),
                       ("split", "tar DIR/wheels and cut it into chunks in DIR/chunks (here)"),
                       ("stash", "check the chunks in DIR/chunks and keep them in --store (there)"),
                       ("install", "stash, then join, check and pip install the wheels (there)")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--dir", type=Path, default=DIR, help="working folder (default: %(default)s)")
        if name == "split":
            p.add_argument("--chunk-mib", type=float, default=CHUNK_MIB, help="chunk size (default: %(default)s)")
        if name in ("stash", "install"):
            p.add_argument("--store", type=Path, default=STORE, help="where chunks are kept (default: %(default)s)")
        if name == "install":
            p.add_argument("--target", type=Path, default=TARGET, help="pip --target (default: %(default)s)")
            p.add_argument("--python", default=sys.executable, help="the Python to install for")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    chunks = args.dir / "chunks"
    try:
        if args.action == "download":
            wheels = download(args.dir / "wheels")
            print(f"{len(wheels)} wheels in {args.dir / 'wheels'}, "
                  f"{sum(w.stat().st_size for w in wheels) / 2**20:.1f} MiB")
        elif args.action == "split":
            if args.chunk_mib <= 0:
                raise WheelsError(f"--chunk-mib must be positive, got {args.chunk_mib}")
            manifest = split(args.dir / "wheels", chunks, int(args.chunk_mib * 2**20))
            rel = chunks.relative_to(REPO) if chunks.is_relative_to(REPO) else chunks
            *first, last = [f"[{rel}/{e['name']}, {rel}/manifest.json]" for e in manifest["chunks"]]
            print(f"{len(manifest['wheels'])} wheels, {manifest['bytes'] / 2**20:.1f} MiB in {len(first) + 1} chunks; "
                  f"device calls, each within the machine's warm time after the one before:")
            for carry in first:
                print(f"  carry {carry}: python3 scripts/wheels.py stash")
            print(f"  carry {last}: bash scripts/gpu_check.sh   (installs, then checks)")
        else:
            missing = stash(chunks, args.store)
            if args.action == "stash":
                print(f"{args.store}: chunks still missing: {', '.join(missing) or 'none'}")
            else:
                install(args.store, args.target, args.python)
    except WheelsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
