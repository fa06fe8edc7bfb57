"""`ran-bench train` and `ran-bench eval` on bad input and failing storage, through the real
commands (the tiny test model on a tiny image set): one `error:` line and exit status 2, never a
traceback; nothing left behind by a new run that fails set-up; the last good checkpoint intact and
the run's train.log saying what happened; an evaluation on other data recorded apart from the
run's result. Full and read-only file systems are real ones (a small tmpfs, remounted read-only).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO
from tmpfs import PAGE, remount, tmpfs

pytestmark = pytest.mark.slow

ENTRY = str(REPO / "tests" / "tiny_model.py")  # the ran-bench CLI with the tiny test model registered
CONFIG = """
model: {{name: test_tiny_net}}
data: {{name: tiny, root: {root}, backend: torchvision, train_size: 32, test_sizes: [32], num_threads: 0}}
optim: {{global_batch_size: 4, per_device_batch_size: 4, lr_per_256: 1.28}}
schedule: {{reference_batch_size: 4, total_steps: 4, milestones: [3]}}
checkpoint: {{every_steps: 2, keep_last: 2}}
eval: {{every_steps: 0, batch_size: 2}}
log: {{every_steps: 1}}
"""


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO / "tests")}
    return subprocess.run([sys.executable, ENTRY, *args], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=600)


def _one_error(proc: subprocess.CompletedProcess) -> str:
    """The single `error:` line of a command that exited 2 without a traceback."""
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-4000:]
    return errors[0]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny data (2 classes x 8 training, 2 validation images), its config, and a finished run
    (4 steps, checkpoints at 2 and 4, results.json)."""
    from ran_bench.data.demo import make_demo

    base = tmp_path_factory.mktemp("errors")
    make_demo(base / "data", num_classes=2, train_per_class=8, val_per_class=2, min_side=24, max_side=40)
    (base / "tiny.yaml").write_text(CONFIG.format(root=base / "data"))
    proc = _run("train", "--config", str(base / "tiny.yaml"), "--run-dir", str(base / "done"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return base


def _partial_copy(setup: Path, dest: Path) -> Path:
    """A copy of the finished run as it was after step 2: its step-4 checkpoint and record removed."""
    shutil.copytree(setup / "done", dest)
    (dest / "checkpoints" / "step_00000004.pt").unlink()
    (dest / "results.json").unlink()
    return dest


def test_a_new_run_that_fails_set_up_leaves_nothing_behind(setup, tmp_path):
    proc = _run("train", "--config", str(setup / "tiny.yaml"), "--run-dir", str(tmp_path / "new"),
                f"data.root={tmp_path / 'missing'}")
    assert _one_error(proc).startswith(f"error: {tmp_path / 'missing' / 'train'} is not a directory")
    assert list(tmp_path.iterdir()) == []  # no run folder holding a one-line train.log


def test_an_error_of_an_existing_run_is_in_its_train_log_and_printed_once(setup, tmp_path):
    run_dir = _partial_copy(setup, tmp_path / "run")
    log_before = (run_dir / "train.log").read_text()
    proc = _run("train", "--run-dir", str(run_dir), f"data.root={tmp_path / 'missing'}")
    error = _one_error(proc)
    assert proc.stderr.count(error.removeprefix("error: ")) == 1  # not also printed by the log
    log = (run_dir / "train.log").read_text()
    assert log.startswith(log_before)
    assert log.splitlines()[-1].endswith(f"ERROR {error.removeprefix('error: ')}")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000002.pt"]


def test_a_full_disk_during_a_checkpoint_is_one_error_and_keeps_the_last_checkpoint(setup, tmp_path):
    """Room for the run's small files and its first checkpoint, not for the second."""
    size = (setup / "done" / "checkpoints" / "step_00000002.pt").stat().st_size
    with tmpfs(tmp_path / "fs", 3 * PAGE + size + size // 2) as fs:
        run_dir = fs / "run"
        proc = _run("train", "--config", str(setup / "tiny.yaml"), "--run-dir", str(run_dir))
        first, second = run_dir / "checkpoints" / "step_00000002.pt", run_dir / "checkpoints" / "step_00000004.pt"
        message = (f"checkpoint not written: cannot write {second}: No space left on device; the newest checkpoint, "
                   f"{first}, is intact. Free space on (or fix) that file system and run the same command again to "
                   "resume")
        assert _one_error(proc) == f"error: {message}"
        assert "During handling of the above exception" not in proc.stderr
        assert sorted(p.name for p in first.parent.iterdir()) == [first.name]  # no temporary file left
        # Intact: it loads, and holds the weights of step 2 of the same run on a roomy disk.
        from ran_bench.checkpoint import load_checkpoint

        weights, expected = (load_checkpoint(p).model for p in (first, setup / "done" / "checkpoints" / first.name))
        assert all(torch.equal(weights[k], expected[k]) for k in expected)
        assert (run_dir / "train.log").read_text().splitlines()[-1].endswith(f"ERROR {message}")


def test_a_read_only_file_system_is_one_error_line(setup, tmp_path):
    """A new run, a resume and an evaluation (whose result is printed first) on a read-only file
    system; nothing on it changes."""
    with tmpfs(tmp_path / "fs", 4 << 20) as fs:
        partial = _partial_copy(setup, fs / "partial")
        done = fs / "done"
        shutil.copytree(setup / "done", done)
        remount(fs, "ro")
        files = {p: p.read_bytes() for p in fs.rglob("*") if p.is_file()}

        new = _run("train", "--config", str(setup / "tiny.yaml"), "--run-dir", str(fs / "new"))
        assert _one_error(new) == \
            f"error: cannot create the run directory {fs / 'new'} (--run-dir): Read-only file system"

        resume = _run("train", "--run-dir", str(partial))
        assert _one_error(resume) == (f"error: cannot write {partial / 'train.log'} (the run directory must be "
                                      "writable): Read-only file system")

        evaluation = _run("eval", str(done))
        assert evaluation.stdout.startswith("test_tiny_net step 4 at 32 px: top-1 err ")
        assert _one_error(evaluation) == (
            f"error: the result above was not recorded in {done}: cannot write {done / 'metrics.jsonl'}: Read-only "
            "file system; make the run directory writable (or copy it somewhere writable) and evaluate again")
        assert {p: p.read_bytes() for p in fs.rglob("*") if p.is_file()} == files


def test_an_evaluation_on_other_data_is_recorded_apart_from_the_runs_result(setup, tmp_path):
    """`eval RUN data.root=OTHER` measures other images: results.json (the run's result, which
    `ran-bench report` reads) and metrics.jsonl keep the run's own; the other data's evaluation
    goes to RUN/evals/<data folder>-<hash>/, naming the data."""
    from ran_bench.data.demo import make_demo
    from ran_bench.report import load_run

    run_dir = tmp_path / "run"
    shutil.copytree(setup / "done", run_dir)
    other = tmp_path / "other"
    make_demo(other, num_classes=2, train_per_class=1, val_per_class=3, min_side=24, max_side=40)
    kept = {name: (run_dir / name).read_bytes() for name in ("results.json", "metrics.jsonl")}

    proc = _run("eval", str(run_dir), f"data.root={other}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert {name: (run_dir / name).read_bytes() for name in kept} == kept
    [record_path] = (run_dir / "evals").glob("*/step_00000004.json")
    assert record_path.parent.name.startswith("other-")
    assert f"updated {record_path} (not the run's data: data.root {other} (the run's: {setup / 'data'}); " \
        in proc.stdout
    record = json.loads(record_path.read_text())
    assert record["data"] == {"root": str(other.resolve()), "name": "tiny", "augmentation": "imagenet"}
    assert [(e["size"], e["step"], e["num_samples"]) for e in record["evaluations"]] == [(32, 4, 6)]
    run = load_run(run_dir)
    assert [e.num_samples for e in run.results.evaluations] == [4]
    assert [m["num_samples"] for m in run.eval_metrics] == [4]

    # The run's own data named another way (a path through a symlink) is the run's data.
    link = tmp_path / "same"
    link.symlink_to(setup / "data")
    same = _run("eval", str(run_dir), f"data.root={link}")
    assert same.returncode == 0, same.stderr[-4000:]
    assert f"updated {run_dir / 'results.json'}" in same.stdout
    assert [m["num_samples"] for m in load_run(run_dir).eval_metrics] == [4, 4]
