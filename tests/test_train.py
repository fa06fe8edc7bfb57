"""The trainer end to end, in 1 and 2 processes (torchrun, gloo on CPU), on a tiny image set.

Few launches, several facts each (each launch pays seconds of start-up):
- 1 process: uninterrupted run A1; run B1 with loader worker processes, stopped by SIGTERM to its
  whole process group (exit 75, loadable checkpoint; the workers ignore it), resumed to the end:
  bitwise A1's weights and A1's metrics.
- 2 processes: uninterrupted run A2; run B2 stopped by a SIGTERM to rank 1 only (both ranks stop
  at the same step), resumed: bitwise A2's weights and metrics; run T2 with loader workers, SIGTERM
  to torchrun and every process under it (as SLURM signals a job step): one checkpoint, resumed
  bitwise to A2's weights.
- A SIGTERM while `ran-bench train` is still starting (before torch is imported) exits 75.
- DDP equivalence: G2 (2 processes x 24 images) against A1 (1 process x 24 images x 2
  accumulation steps), a global batch of 48 = the whole training set, so both runs see the same
  images at every step however the loader shards them. Both use the GroupNorm variant of the tiny
  model: with BatchNorm, the statistics of 2 x 24 images split one way differ from those of the
  other split, so the weights would differ for a legitimate reason. The 2-process BatchNorm runs
  (A2, B2) cover BatchNorm buffers in checkpoints and evaluation instead.
- Exact evaluation: the validation set has 18 images, not a multiple of 2 processes x batch 4;
  `ran-bench eval` of A2 in 1 process equals A2's 2-process evaluation, counts all 18 images, and
  matches the error computed here image by image.
- Gradient accumulation across an epoch boundary: a global batch of 20 = 4 x 5 micro-batches over
  48 images, so optimizer steps 3 and 5 take micro-batches from two epochs; a run stopped after
  step 3 (schedule.max_steps) and continued ends bitwise where the uninterrupted run U ends.
- The record: a finished run is not redone, a changed recipe is refused, `ran-bench eval` of an
  older checkpoint leaves results.json alone, and a record built by eval describes the training
  run (its device, precision, throughput and GPU time), not the evaluating machine.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from conftest import REPO, run_torchrun
from ran_bench.runtime import free_port

pytestmark = [pytest.mark.dist, pytest.mark.slow]

ENTRY = str(REPO / "tests" / "tiny_model.py")  # the ran-bench CLI with the tiny test model registered
TIMING_KEYS = {"images_per_s", "data_wait_s", "time"}
VAL_IMAGES = 18
# Global batch of 8 = 2 x 4 (BatchNorm runs, 10 steps crossing an epoch boundary) or of 48, the whole
# training set, = 2 x 24 or 1 x 24 x 2 accumulation (GroupNorm runs, 8 steps): with full-batch
# steps every run sees the same images at every step however the loader shards them over ranks.
CONFIG = """
model: {{name: test_tiny_net, options: {{norm: {norm}}}}}
data: {{name: tiny, root: {root}, backend: torchvision, train_size: 32, test_sizes: [32], num_threads: 0,
        label_noise: {noise}}}
optim: {{global_batch_size: {batch}, per_device_batch_size: {per_device}, lr_per_256: {lr_per_256}}}
schedule: {{reference_batch_size: {batch}, total_steps: {steps}, milestones: [7]}}
checkpoint: {{every_steps: 4, keep_last: 2}}
eval: {{every_steps: 5, batch_size: 4}}
log: {{every_steps: 2}}
"""
STEPS = {"batch": 10, "group": 8}
ACCUMULATION = """
model: {{name: test_tiny_net}}
data: {{name: tiny, root: {root}, backend: torchvision, train_size: 32, test_sizes: [32], num_threads: 0}}
optim: {{global_batch_size: 20, per_device_batch_size: 4, lr_per_256: 1.28}}
schedule: {{reference_batch_size: 20, total_steps: 6, milestones: [4]}}
checkpoint: {{every_steps: 3, keep_last: 3}}
eval: {{every_steps: 0, batch_size: 6}}
log: {{every_steps: 1}}
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from ran_bench.data.demo import make_demo

    base = tmp_path_factory.mktemp("train")
    # 6 classes x 8 = 48 training images (6 steps of 8 per epoch, so 10 steps cross an epoch),
    # 6 x 3 = 18 validation images.
    make_demo(base / "data", num_classes=6, train_per_class=8, val_per_class=3, min_side=36, max_side=48)
    # The GroupNorm runs also train with label noise (the same noisy labels in 1 and 2 processes).
    for norm, noise, batch, per_device in (("batch", 0.0, 8, 4), ("group", 0.25, 48, 24)):
        (base / f"{norm}.yaml").write_text(CONFIG.format(
            norm=norm, root=base / "data", noise=noise, batch=batch, per_device=per_device,
            lr_per_256=0.1 * 256 / batch, steps=STEPS[norm]))  # learning rate 0.1
    (base / "accumulation.yaml").write_text(ACCUMULATION.format(root=base / "data"))
    return base


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO / "tests")}


def _python(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, ENTRY, *args], capture_output=True, text=True, env=_env(), cwd=REPO,
                          timeout=600)
    if check and proc.returncode != 0:
        pytest.fail(f"{args} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    return run_torchrun([ENTRY, *args], env={"PYTHONPATH": str(REPO / "tests")})


def _wait_for_metrics(run_dir: Path, proc: subprocess.Popen, min_step: int) -> None:
    """Block until the run has logged a training line at `min_step` or later."""
    path = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"run ended (exit {proc.returncode}) before step {min_step}\n{err[-6000:]}")
        if path.is_file():
            steps = [json.loads(x)["step"] for x in path.read_text().splitlines() if x.strip()]
            if any(s >= min_step for s in steps):
                return
        time.sleep(0.02)
    pytest.fail("timed out waiting for the run to log")


def _final_weights(run_dir: Path, steps: int) -> dict[str, torch.Tensor]:
    from ran_bench.checkpoint import list_checkpoints, load_checkpoint

    newest = list_checkpoints(run_dir / "checkpoints")[-1]
    state = load_checkpoint(newest)
    assert state.step == steps, f"{newest}: the run did not reach its last step"
    return state.model


def _metrics(run_dir: Path) -> list[dict]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k not in TIMING_KEYS} for line in lines]


def _assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


@pytest.fixture(scope="module")
def run_a1(setup):
    _python("train", "--config", str(setup / "group.yaml"), "--run-dir", str(setup / "A1"))
    return setup / "A1"


@pytest.fixture(scope="module")
def run_a2(setup):
    _torchrun("train", "--config", str(setup / "batch.yaml"), "--run-dir", str(setup / "A2"))
    return setup / "A2"


def _wait_for_loader_workers(trainers: list[psutil.Process], proc: subprocess.Popen) -> None:
    """Block until each trainer process has DataLoader worker processes running (they restart with
    every epoch of the tiny data set, so a signal may also fall between two sets of workers), and
    check that they ignore the stop signals: a worker that dies of one can end the run before it
    checkpoints (or, when its batches are already prefetched, not, which is why this is checked)."""
    deadline = time.monotonic() + 120
    while not all(t.children() for t in trainers):
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail("the trainers never had loader worker processes")
        time.sleep(0.01)
    for worker in (w for t in trainers for w in t.children()):
        try:
            status = Path(f"/proc/{worker.pid}/status").read_text()
        except FileNotFoundError:
            continue  # this epoch's workers have just been shut down
        # ignored, or still blocked as inherited from the trainer until the worker's init sets that
        shielded = int(re.search(r"SigIgn:\s*([0-9a-f]+)", status)[1], 16) | int(
            re.search(r"SigBlk:\s*([0-9a-f]+)", status)[1], 16)
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            assert shielded & (1 << sig - 1), f"loader worker {worker.pid} can be killed by {sig.name}"


def test_one_process_with_loader_workers_stops_on_sigterm_to_its_process_group_and_resumes_bitwise(
        setup, run_a1):
    """What SLURM does to a job step: SIGTERM to every process, the loader's workers included. The
    workers ignore it; the trainer finishes its step, checkpoints and exits 75."""
    from ran_bench.checkpoint import list_checkpoints, load_checkpoint
    from ran_bench.train import REQUEUE_EXIT_CODE

    run_dir = setup / "B1"
    proc = subprocess.Popen([sys.executable, ENTRY, "train", "--config", str(setup / "group.yaml"),
                             "--run-dir", str(run_dir), "data.num_threads=2"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(), cwd=REPO, start_new_session=True)
    _wait_for_metrics(run_dir, proc, min_step=2)
    _wait_for_loader_workers([psutil.Process(proc.pid)], proc)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == REQUEUE_EXIT_CODE == 75, err[-4000:]
    newest = list_checkpoints(run_dir / "checkpoints")[-1]
    stopped_at = load_checkpoint(newest).step
    assert 2 <= stopped_at < 8, "the signal should stop the run mid-way"
    assert f"stopped by signal SIGTERM after step {stopped_at}" in err
    assert not (run_dir / "results.json").exists()

    # Starting again with only the run directory resumes and completes the run, with the weights of
    # the uninterrupted run that loaded its data in-process.
    resumed = _python("train", "--run-dir", str(run_dir))
    assert f"resumed from {newest} at step {stopped_at}" in resumed.stderr
    _assert_bitwise_equal(_final_weights(run_dir, 8), _final_weights(run_a1, 8))
    assert _metrics(run_dir) == _metrics(run_a1)
    assert json.loads((run_dir / "results.json").read_text())["steps"] == 8


def test_torchrun_with_loader_workers_stops_at_one_checkpoint_on_sigterm_to_every_process(setup, run_a2):
    """SIGTERM to torchrun, its ranks and their loader workers at once (SLURM's scancel, requeue or
    preemption of a job step): both ranks stop after the same step, rank 0 writes one checkpoint,
    and the resumed run ends bitwise where the uninterrupted one did."""
    from ran_bench.checkpoint import list_checkpoints, load_checkpoint

    run_dir = setup / "T2"
    torchrun = str(Path(sys.executable).parent / "torchrun")
    proc = subprocess.Popen([torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), ENTRY, "train",
                             "--config", str(setup / "batch.yaml"), "--run-dir", str(run_dir),
                             "checkpoint.every_steps=100", "data.num_threads=2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=REPO)
    _wait_for_metrics(run_dir, proc, min_step=2)
    ranks = [p for p in psutil.Process(proc.pid).children() if "RANK" in p.environ()]
    assert len(ranks) == 2, "torchrun should have started 2 workers"
    _wait_for_loader_workers(ranks, proc)
    everyone = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in everyone:
        p.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    checkpoints = list_checkpoints(run_dir / "checkpoints")
    assert len(checkpoints) == 1, (checkpoints, err[-4000:])
    stopped_at = load_checkpoint(checkpoints[0]).step
    assert 2 <= stopped_at < 10, err[-4000:]
    assert "is killed by signal" not in err, err[-4000:]  # no loader worker died of it
    assert f"[rank 1] WARNING stopped by signal SIGTERM after step {stopped_at}" in err, err[-4000:]
    assert f"stopped by signal SIGTERM after step {stopped_at}" in (run_dir / "train.log").read_text()

    resumed = _torchrun("train", "--run-dir", str(run_dir))
    assert f"resumed from {checkpoints[0]} at step {stopped_at}" in resumed.stderr
    _assert_bitwise_equal(_final_weights(run_dir, 10), _final_weights(run_a2, 10))
    assert _metrics(run_dir) == _metrics(run_a2)


def test_a_sigterm_during_start_up_exits_75_without_training(setup):
    """`ran-bench train` catches the stop signals before it imports torch (seconds of start-up on a
    busy node): a job preempted while starting is requeued (75), not failed (143)."""
    run_dir = setup / "early"
    proc = subprocess.Popen([sys.executable, "-m", "ran_bench", "train", "--config", "configs/demo.yaml",
                             "--run-dir", str(run_dir), f"data.root={setup / 'data'}"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(), cwd=REPO)
    status, maps = Path(f"/proc/{proc.pid}/status"), Path(f"/proc/{proc.pid}/maps")
    deadline = time.monotonic() + 60
    while not int(re.search(r"SigCgt:\s*([0-9a-f]+)", status.read_text()).group(1), 16) & (1 << signal.SIGTERM - 1):
        assert proc.poll() is None and time.monotonic() < deadline, "the SIGTERM handler was never installed"
        time.sleep(0.001)
    torch_loaded = "libtorch" in maps.read_text()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert not torch_loaded, "the handler was installed only after importing torch"
    assert proc.returncode == 75, err[-4000:]
    assert "stopped by a signal before training started" in err
    assert not (run_dir / "checkpoints").exists()


def test_two_processes_stop_together_on_one_ranks_signal_and_resume_bitwise(setup, run_a2):
    from ran_bench.checkpoint import list_checkpoints, load_checkpoint

    run_dir = setup / "B2"
    torchrun = str(Path(sys.executable).parent / "torchrun")
    proc = subprocess.Popen([torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), ENTRY, "train",
                             "--config", str(setup / "batch.yaml"), "--run-dir", str(run_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=REPO)
    _wait_for_metrics(run_dir, proc, min_step=2)
    workers = {int(p.environ()["RANK"]): p for p in psutil.Process(proc.pid).children(recursive=True)
               if "RANK" in p.environ()}
    assert sorted(workers) == [0, 1], "torchrun should have started 2 workers"
    workers[1].send_signal(signal.SIGTERM)  # only rank 1 is signalled
    _, err = proc.communicate(timeout=300)
    newest = list_checkpoints(run_dir / "checkpoints")[-1]
    stopped_at = load_checkpoint(newest).step
    assert 2 <= stopped_at < 10
    # Rank 1 saw the signal, rank 0 learnt it from the all-reduce; both stopped after the same step.
    assert f"[rank 1] WARNING stopped by signal SIGTERM after step {stopped_at}" in err, err[-4000:]
    assert f"stopped by signal (on another rank) after step {stopped_at}" in (run_dir / "train.log").read_text()
    assert "exitcode  : 75" in err  # torchrun's report of the workers' exit status

    resumed = _torchrun("train", "--run-dir", str(run_dir))
    assert f"resumed from {newest} at step {stopped_at}" in resumed.stderr
    _assert_bitwise_equal(_final_weights(run_dir, 10), _final_weights(run_a2, 10))
    assert _metrics(run_dir) == _metrics(run_a2)


def test_two_processes_train_like_one_with_the_same_global_batch(setup, run_a1):
    run_dir = setup / "G2"
    proc = _torchrun("train", "--config", str(setup / "group.yaml"), "--run-dir", str(run_dir))
    assert "2 process(es) on cpu" in proc.stderr
    assert "global batch 48 = 2 x 24 per device x 1 accumulation" in proc.stderr
    assert "1 process(es)" in (run_a1 / "train.log").read_text()
    assert "global batch 48 = 1 x 24 per device x 2 accumulation" in (run_a1 / "train.log").read_text()
    one, two = _final_weights(run_a1, 8), _final_weights(run_dir, 8)
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5, msg=f"{key} differs")
    # The same schedule: identical steps, epochs and learning rates, near-identical losses.
    m1 = [m for m in _metrics(run_a1) if m["kind"] == "train"]
    m2 = [m for m in _metrics(run_dir) if m["kind"] == "train"]
    assert [(m["step"], m["epoch"], m["lr"]) for m in m1] == [(m["step"], m["epoch"], m["lr"]) for m in m2]
    assert [m["loss"] for m in m1] == pytest.approx([m["loss"] for m in m2], rel=1e-4)
    # And training changed the weights (the comparison is not between two untouched models).
    assert not torch.equal(one["fc.weight"], _initial_fc(setup))


def test_label_noise_changes_a_quarter_of_the_labels_to_other_classes(setup, run_a1):
    from ran_bench.data import list_samples

    _, labels, _ = list_samples(setup / "data", "train")
    record = json.loads((run_a1 / "label_noise.json").read_text())
    changes = record["changes_index_from_to"]
    assert (record["fraction"], record["seed"], record["num_samples"]) == (0.25, 0, 48)
    assert record["num_changed"] == len(changes) == 12  # round(0.25 x 48)
    assert len({i for i, _, _ in changes}) == 12
    assert all(labels[i] == old != new and 0 <= new < 6 for i, old, new in changes)
    assert json.loads((run_a1 / "results.json").read_text())["label_noise"] == 0.25


def _initial_fc(setup) -> torch.Tensor:
    from accelerate.utils import set_seed

    import tiny_model  # noqa: F401 - registers test_tiny_net
    from ran_bench.models import create_model

    set_seed(0)
    return create_model("test_tiny_net", num_classes=6, norm="group").fc.weight.detach()


def test_evaluation_is_exact_across_processes(setup, run_a2):
    from ran_bench.checkpoint import list_checkpoints, load_checkpoint
    from ran_bench.data import build_loader

    results = json.loads((run_a2 / "results.json").read_text())
    assert (results["model"], results["world_size"], results["device_type"], results["precision"]) == \
        ("test_tiny_net", 2, "cpu", "fp32")
    assert (results["steps"], results["total_steps"], results["images_seen"], results["epochs"]) == \
        (10, 10, 80, 80 / 48)
    # conv 3x8x3x3 + BN 2x8 + conv 8x16x3x3 + BN 2x16 + FC 16x6+6; MACs at 32 px: 32x32x216 + 16x16x1152 + 96
    assert (results["params"], results["macs"], results["macs_input_size"]) == (1518, 516_192, 32)
    assert results["gpu_hours"] == 0 and results["wall_time_s"] > 0 and not (run_a2 / "label_noise.json").exists()
    two = results["evaluations"]
    assert [e["size"] for e in two] == [32]
    assert two[0]["num_samples"] == VAL_IMAGES and VAL_IMAGES % (2 * 4) != 0

    out = _python("eval", str(run_a2))  # 1 process
    one = json.loads((run_a2 / "results.json").read_text())["evaluations"]
    assert one[0]["num_samples"] == VAL_IMAGES
    assert (one[0]["top1_err"], one[0]["top5_err"]) == (two[0]["top1_err"], two[0]["top5_err"]), out.stdout

    # The same error image by image, with plain torch, from the final checkpoint's weights.
    import tiny_model  # noqa: F401
    from ran_bench.models import create_model

    state = load_checkpoint(list_checkpoints(run_a2 / "checkpoints")[-1])
    model = create_model("test_tiny_net", num_classes=6, norm="batch")
    model.load_state_dict(state.model)
    model.eval()
    wrong1 = wrong5 = n = 0
    with torch.no_grad():
        for images, labels in build_loader(setup / "data", "val", size=32, batch_size=5, backend="torchvision",
                                           num_threads=0):
            top5 = model(images).topk(5, dim=1).indices
            wrong1 += int((top5[:, 0] != labels).sum())
            wrong5 += int((top5 != labels[:, None]).all(dim=1).sum())
            n += len(labels)
    assert n == VAL_IMAGES
    assert one[0]["top1_err"] == pytest.approx(100 * wrong1 / n, abs=1e-4)
    assert one[0]["top5_err"] == pytest.approx(100 * wrong5 / n, abs=1e-4)


@pytest.fixture(scope="module")
def run_u(setup):
    """The accumulation recipe, uninterrupted: steps 1-6, checkpoints at 3 and 6, results.json."""
    _python("train", "--config", str(setup / "accumulation.yaml"), "--run-dir", str(setup / "U"))
    return setup / "U"


@pytest.fixture(scope="module")
def run_r3(setup):
    """The accumulation recipe stopped after step 3 (a partial run), and a copy of it."""
    _python("train", "--config", str(setup / "accumulation.yaml"), "--run-dir", str(setup / "R"),
            "schedule.max_steps=3")
    shutil.copytree(setup / "R", setup / "R-copy")
    return setup / "R"


def test_accumulation_window_across_an_epoch_boundary_resumes_bitwise(setup, run_u, run_r3):
    from ran_bench.checkpoint import load_checkpoint

    at3 = load_checkpoint(run_r3 / "checkpoints" / "step_00000003.pt")
    # 15 micro-batches of 4 done, 12 per epoch: the window of step 3 spanned epochs 0 and 1.
    assert (at3.epoch, at3.ranks[0]["data"]["batches"], at3.images_seen) == (1, 3, 60)
    assert json.loads((run_r3 / "results.json").read_text())["steps"] == 3  # a partial record
    resumed = _python("train", "--run-dir", str(run_r3), "schedule.max_steps=null")
    assert "resumed from" in resumed.stderr and "at step 3 (epoch 1)" in resumed.stderr
    _assert_bitwise_equal(_final_weights(run_r3, 6), _final_weights(run_u, 6))
    train_lines = lambda run: [m for m in _metrics(run) if m["kind"] == "train"]  # noqa: E731
    assert train_lines(run_r3) == train_lines(run_u)

    # Training throughput covers both segments: 6 steps x 20 images over their summed step time.
    last = load_checkpoint(run_r3 / "checkpoints" / "step_00000006.pt")
    assert last.train_images == 120 and last.train_seconds > at3.train_seconds > 0
    results = json.loads((run_r3 / "results.json").read_text())
    assert results["train_images_per_s"] == last.train_images / last.train_seconds
    assert (results["steps"], results["augmentation"], results["skipped_images"]) == (6, "imagenet", 0)
    assert results["evaluations"][0]["skipped_images"] == 0
    assert (results["evaluations"][0]["device_type"], results["evaluations"][0]["precision"]) == ("cpu", "fp32")


def test_a_finished_run_is_not_trained_or_evaluated_again(run_u):
    before = (run_u / "results.json").read_bytes()
    checkpoints = sorted(p.name for p in (run_u / "checkpoints").iterdir())
    again = _python("train", "--run-dir", str(run_u))
    assert f"already complete: {run_u / 'results.json'}" in again.stderr
    assert (run_u / "results.json").read_bytes() == before
    assert sorted(p.name for p in (run_u / "checkpoints").iterdir()) == checkpoints


def test_resume_with_a_changed_recipe_is_refused_and_a_new_split_of_the_batch_is_not(setup, run_r3):
    run_dir = setup / "R-copy"  # stopped at step 3
    config = (run_dir / "config.yaml").read_text()
    refused = _python("train", "--run-dir", str(run_dir), "optim.lr_per_256=2.56", "schedule.milestones=[5]",
                      check=False)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "error: " in refused.stderr and "was trained with a different recipe" in refused.stderr
    assert "optim.lr_per_256: 1.28 in the checkpoint, 2.56 now; schedule.milestones: [4] in the checkpoint, [5] now" \
        in refused.stderr
    assert "Traceback" not in refused.stderr
    assert (run_dir / "config.yaml").read_text() == config  # the run's config is left as it was

    # 20 = 2 per device x 10 micro-batches instead of 4 x 5: the same recipe, resumed from the start of
    # epoch 1. The checkpoint is made to say that the segment before ran on 2 devices (GPU time is
    # counted per segment: its processes x its wall time).
    from ran_bench.checkpoint import load_checkpoint, save_checkpoint

    at3 = load_checkpoint(run_dir / "checkpoints" / "step_00000003.pt")
    save_checkpoint(run_dir / "checkpoints", dataclasses.replace(at3, device_seconds=2 * at3.elapsed_s), keep_last=3)
    split = _python("train", "--run-dir", str(run_dir), "schedule.max_steps=null", "optim.per_device_batch_size=2")
    assert "was written by 1 processes x 4 images per device, this run has 1 x 2" in split.stderr
    assert json.loads((run_dir / "results.json").read_text())["steps"] == 6
    last = load_checkpoint(run_dir / "checkpoints" / "step_00000006.pt")
    assert last.device_seconds == pytest.approx(2 * at3.elapsed_s + 1 * (last.elapsed_s - at3.elapsed_s))


def test_eval_of_an_older_checkpoint_leaves_the_record_of_the_finished_run(run_u):
    before = (run_u / "results.json").read_bytes()
    out = _python("eval", str(run_u / "checkpoints" / "step_00000003.pt"))
    assert (run_u / "results.json").read_bytes() == before
    record = json.loads((run_u / "evals" / "step_00000003.json").read_text())
    assert f"updated {run_u / 'evals' / 'step_00000003.json'}" in out.stdout
    assert record["step"] == 3 and record["checkpoint"].endswith("step_00000003.pt")
    assert [(e["size"], e["step"], e["num_samples"]) for e in record["evaluations"]] == [(32, 3, VAL_IMAGES)]


def test_a_record_built_by_eval_describes_the_training_run(setup, run_u):
    """A run whose record is older than its newest checkpoint (a partial record at step 3, then trained
    to step 6 and stopped before its final evaluation): `ran-bench eval` builds the record of step 6
    from what the checkpoint saved about training (here: 8 H100s in bf16), notes its own device on
    its evaluation, counts an unreadable validation image in it, and keeps the step-3 evaluation. The
    run's data (data.root of its checkpoint) holds the unreadable image: evaluations on other data
    are recorded apart."""
    from ran_bench.checkpoint import load_checkpoint, save_checkpoint
    from ran_bench.results import load_results

    run_dir = setup / "E"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(run_u / "config.yaml", run_dir / "config.yaml")
    partial = load_results(run_u)
    partial.steps, partial.evaluations[0].step, partial.evaluations[0].top1_err = 3, 3, 50.0
    partial.save(run_dir / "results.json")
    data = setup / "data-one-bad"
    shutil.copytree(setup / "data", data)
    (sorted((data / "val").iterdir())[0] / "broken.JPEG").write_bytes(b"not a JPEG")
    state = load_checkpoint(run_u / "checkpoints" / "step_00000006.pt")
    state = dataclasses.replace(
        state, device_type="cuda", device_name="NVIDIA H100 80GB HBM3", precision="bf16", world_size=8,
        device_seconds=8 * 3600.0, train_images=120, train_seconds=0.5, skipped_files=["a.JPEG"],
        config=state.config.replace(f"root: {setup / 'data'}\n", f"root: {data}\n"))
    save_checkpoint(run_dir / "checkpoints", state, keep_last=1)

    _python("eval", str(run_dir))
    results = json.loads((run_dir / "results.json").read_text())
    assert (results["device_type"], results["device_name"], results["precision"], results["world_size"]) == \
        ("cuda", "NVIDIA H100 80GB HBM3", "bf16", 8)
    assert (results["gpu_hours"], results["train_images_per_s"], results["skipped_images"]) == (8.0, 240.0, 1)
    assert results["infer_images_per_s"] is None  # not measured on the training machine
    [evaluation] = results["evaluations"]
    assert (evaluation["device_type"], evaluation["precision"]) == ("cpu", "fp32")
    assert (evaluation["num_samples"], evaluation["skipped_images"]) == (VAL_IMAGES + 1, 1)
    moved = json.loads((run_dir / "evals" / "step_00000003.json").read_text())["evaluations"]
    assert [(e["step"], e["top1_err"]) for e in moved] == [(3, 50.0)]
