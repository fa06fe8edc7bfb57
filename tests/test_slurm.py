"""The cluster launchers on a real SLURM cluster (CI starts one with slurm/ci/start-slurm.sh, NODES=2).

Smoke jobs of the real scripts and of `ran-bench submit`: the demo config on a tiny demo data set,
2 CPU processes (gloo), one loader worker process each, 8 optimizer steps with a checkpoint every 2
(the SMOKE=1 settings of slurm/common.sh; the submit jobs get the same overrides). Facts checked:
- `sbatch --wait slurm/ran92_8gpu.sh` exits 0 and leaves a complete results.json of world size 2;
- a job requeued mid-run (`scontrol requeue`) comes back, resumes from its checkpoint and ends with
  bitwise the weights of the uninterrupted job;
- the script's own time-limit path (SIGUSR1 to the batch shell, as --signal=B:USR1 sends it) stops
  the trainers at a checkpoint, requeues the job, and the resumed job ends with the same weights;
- the multi-node script on 2 nodes (1 process per node) trains with world size 2, one launcher on
  SLURM node 0 and one on node 1, also when the job was submitted with several tasks per node;
- a 2-node job whose trainers fail (a bad data.root) ends failed, without requeueing itself;
- a 2-node job requeued mid-run (`scontrol requeue`: SIGTERM to every process, loader workers
  included) writes one checkpoint on the signal, resumes from it and ends with the same weights;
- a script submitted by its path from another folder finds the repository;
- `ran-bench submit` with a partition the cluster does not have is a one-line error;
- `ran-bench submit` runs 2 tasks as 2 ranks to the end; interrupted through submitit's preemption
  path (`job._interrupt()`), the job requeues itself, resumes and ends with the same weights.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO

SMOKE_OVERRIDES = ["optim.global_batch_size=16", "optim.per_device_batch_size=8", "schedule.reference_batch_size=16",
                   "schedule.total_steps=8", "schedule.warmup_steps=0", "checkpoint.every_steps=2",
                   "log.every_steps=1", "eval.batch_size=25", "data.num_threads=1"]
STEPS = 8
JOB_TIMEOUT_S = 600


def _no_cluster_reason() -> str | None:
    start = ("start one: P=/tmp/ran-bench-slurm NODES=2 bash slurm/ci/start-slurm.sh; "
             "export SLURM_CONF=/tmp/ran-bench-slurm/etc/slurm.conf")
    if not os.environ.get("SLURM_CONF"):
        return f"no SLURM cluster: SLURM_CONF is not set ({start})"
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return f"no SLURM cluster: sinfo/sbatch are not installed ({start})"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%D"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "no SLURM cluster: sinfo timed out"
    if out.returncode != 0:
        return f"no SLURM cluster: sinfo failed: {out.stderr.strip()}"
    return None


_REASON = _no_cluster_reason()
pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]


def _num_idle_capable_nodes() -> int:
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True, timeout=30)
    return len(set(out.stdout.split()))


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    from ran_bench.data.demo import make_demo

    base = tmp_path_factory.mktemp("slurm")
    # 4 classes x 16 = 64 training images: 4 steps of 16 per epoch; 20 validation images.
    make_demo(base / "data", num_classes=4, train_per_class=16, val_per_class=5, min_side=36, max_side=48)
    return base


def _job_env(data: Path, run_dir: Path, overrides: str = "") -> dict:
    return {**os.environ, "SMOKE": "1", "DATA_ROOT": str(data), "RUN_DIR": str(run_dir), "OVERRIDES": overrides,
            "OMP_NUM_THREADS": "1"}


def _sbatch(script: str, env: dict, log_dir: Path, *options: str, wait: bool = True):
    """Submit a smoke job of `script` (no GPUs); with wait, return (exit code, job id, log text)."""
    cmd = ["sbatch", "--gres=none", f"--output={log_dir}/%x-%j.out", *options]
    if wait:
        proc = subprocess.run([*cmd, "--wait", script], env=env, cwd=REPO, capture_output=True, text=True,
                              timeout=JOB_TIMEOUT_S)
        job_id = re.search(r"Submitted batch job (\d+)", proc.stdout).group(1)
        return proc.returncode, job_id, _log(log_dir, job_id)
    proc = subprocess.Popen([*cmd, "--wait", script], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    job_id = re.search(r"Submitted batch job (\d+)", proc.stdout.readline()).group(1)
    return proc, job_id


def _log(log_dir: Path, job_id: str) -> str:
    return "".join(p.read_text() for p in log_dir.glob(f"*-{job_id}.out"))


def _wait_for(path: Path, what: str, timeout: float = JOB_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what} ({path})")
        time.sleep(0.25)


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / f"step_{STEPS:08d}.pt", map_location="cpu",
                      weights_only=False)["model"]


def _assert_same_weights(run_dir: Path, reference: Path) -> None:
    a, b = _final_weights(run_dir), _final_weights(reference)
    assert a.keys() == b.keys()
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differing, f"{run_dir} and the uninterrupted {reference} differ in {differing[:5]}"


def _results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def _train_steps(run_dir: Path) -> list[int]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x["step"] for x in lines if x["kind"] == "train"]


@pytest.fixture(scope="module")
def reference(demo) -> Path:
    """An uninterrupted `sbatch --wait slurm/ran92_8gpu.sh` smoke job; its run directory."""
    run_dir = demo / "runs" / "uninterrupted"
    rc, job_id, log = _sbatch("slurm/ran92_8gpu.sh", _job_env(demo / "data", run_dir), demo)
    assert rc == 0, f"job {job_id} exited {rc}:\n{log[-5000:]}"
    return run_dir


def test_sbatch_single_node_smoke(reference):
    results = _results(reference)
    assert results["world_size"] == 2
    assert results["steps"] == results["total_steps"] == STEPS
    assert results["evaluations"][0]["num_samples"] == 20
    assert _train_steps(reference) == list(range(1, STEPS + 1))


def _interrupted_job(demo: Path, run_dir: Path, interrupt: list[str]) -> tuple[subprocess.Popen, str, str, str]:
    """Run the single-node script, send `interrupt` + [job id] after its first checkpoint, wait for
    the job to end; (process, job id, sbatch output, job log)."""
    proc, job_id = _sbatch("slurm/ran92_8gpu.sh", _job_env(demo / "data", run_dir), demo, wait=False)
    try:
        _wait_for(run_dir / "checkpoints" / "step_00000002.pt", "the first checkpoint")
        subprocess.run([*interrupt, job_id], check=True, timeout=30)
        out, _ = proc.communicate(timeout=JOB_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            subprocess.run(["scancel", job_id], timeout=30)
            proc.kill()
    return proc, job_id, out, _log(demo, job_id)


def test_requeued_job_resumes_with_the_same_weights(demo, reference):
    run_dir = demo / "runs" / "requeued"
    proc, job_id, out, log = _interrupted_job(demo, run_dir, ["scontrol", "requeue"])
    assert proc.returncode == 0, f"job {job_id} exited {proc.returncode}:\n{out}\n{log[-5000:]}"
    assert f"job {job_id} attempt 2] start" in log, log[-3000:]
    resumed = re.findall(r"resumed from \S+step_(\d+)\.pt", (run_dir / "train.log").read_text())
    assert len(resumed) == 1 and 2 <= int(resumed[0]) < STEPS, resumed
    assert _results(run_dir)["steps"] == STEPS
    assert _train_steps(run_dir) == list(range(1, STEPS + 1))
    _assert_same_weights(run_dir, reference)


def test_time_limit_signal_checkpoints_requeues_and_resumes_with_the_same_weights(demo, reference):
    """The pre-timeout path: --signal=B:USR1 reaches the batch shell only (here by scancel --batch), which
    forwards it to the step; the trainers checkpoint and exit 75 and the script requeues the job."""
    run_dir = demo / "runs" / "time-limit"
    proc, job_id, out, log = _interrupted_job(demo, run_dir, ["scancel", "--batch", "--signal=USR1"])
    assert proc.returncode == 0, f"job {job_id} exited {proc.returncode}:\n{out}\n{log[-5000:]}"
    for line in ["received SIGUSR1 (time limit near)", "exit 75 on every node): requeueing job",
                 f"job {job_id} attempt 2] start",
                 f"job {job_id} attempt 2] finished"]:
        assert line in log, f"{line!r} not in:\n{log[-3000:]}"
    resumed = re.findall(r"resumed from \S+step_(\d+)\.pt", (run_dir / "train.log").read_text())
    assert len(resumed) == 1 and 2 <= int(resumed[0]) < STEPS, resumed
    assert _train_steps(run_dir) == list(range(1, STEPS + 1))
    _assert_same_weights(run_dir, reference)


def test_multinode_script_spans_two_nodes(demo):
    if _num_idle_capable_nodes() < 2:
        pytest.skip("the cluster has one node; start it with NODES=2")
    run_dir = demo / "runs" / "two-nodes"
    # Several tasks per node in the job: still one launcher per node (srun must not inherit them).
    rc, job_id, log = _sbatch("slurm/ran92_4x8gpu.sh", _job_env(demo / "data", run_dir), demo, "--nodes=2",
                              "--ntasks-per-node=2")
    assert rc == 0, f"job {job_id} exited {rc}:\n{log[-5000:]}"
    launchers = re.findall(r"\[ran-bench node (\d+)/(\d+) (\S+)\] main (\S+):(\d+), 1 process", log)
    assert sorted((rank, total) for rank, total, *_ in launchers) == [("0", "2"), ("1", "2")], log[-3000:]
    assert len({name for _, _, name, _, _ in launchers}) == 2  # two SLURM nodes
    assert len({(addr, port) for *_, addr, port in launchers}) == 1  # one rendezvous point
    results = _results(run_dir)
    assert results["world_size"] == 2 and results["steps"] == STEPS


def test_multinode_job_that_fails_is_not_requeued(demo):
    """One node failing makes srun stop the others, whose trainers checkpoint and exit 75; the job
    must end failed, with the failing node's status, not requeue itself again and again."""
    if _num_idle_capable_nodes() < 2:
        pytest.skip("the cluster has one node; start it with NODES=2")
    run_dir = demo / "runs" / "bad-root"
    env = _job_env(demo / "data", run_dir, overrides=f"data.root={demo / 'no-such-data'}")
    rc, job_id, log = _sbatch("slurm/ran92_4x8gpu.sh", env, demo, "--nodes=2")
    assert rc not in (0, 75), f"job {job_id} exited {rc}:\n{log[-5000:]}"
    assert re.search(r"failed: node [01] \(\S+\) exited with \d+", log), log[-3000:]
    assert "attempt 2" not in log and "requeueing" not in log, log[-3000:]
    restarts = subprocess.run(["sacct", "-n", "-X", "-j", job_id, "-o", "State,ExitCode", "-P"], capture_output=True,
                              text=True, timeout=30).stdout.split()
    assert restarts and restarts[0].startswith("FAILED|"), restarts


def _wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen) -> None:
    """Block until the run has logged a training line at `step` or later."""
    path, deadline = run_dir / "metrics.jsonl", time.monotonic() + JOB_TIMEOUT_S
    while True:
        lines = path.read_text().splitlines() if path.is_file() else []
        # the last line may be half-written
        if any(line.endswith("}") and json.loads(line)["step"] >= step for line in lines):
            return
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"the job ended or timed out before step {step}")
        time.sleep(0.1)


def test_multinode_job_requeued_mid_run_checkpoints_once_and_resumes_with_the_same_weights(demo, reference):
    """`scontrol requeue` of a running 2-node job: SLURM sends SIGTERM to every process of the job
    (batch shell, launchers, trainers and their loader workers), then requeues it. Periodic
    checkpoints are out of reach (every 100 steps), so the checkpoint the trainers write on the
    signal is the only one; the requeued job resumes from it and ends with the weights of the
    uninterrupted single-node job of the same world size."""
    if _num_idle_capable_nodes() < 2:
        pytest.skip("the cluster has one node; start it with NODES=2")
    run_dir = demo / "runs" / "two-nodes-requeued"
    env = _job_env(demo / "data", run_dir, overrides="checkpoint.every_steps=100")
    proc, job_id = _sbatch("slurm/ran92_4x8gpu.sh", env, demo, "--nodes=2", wait=False)
    try:
        _wait_for_step(run_dir, 2, proc)
        subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=30)
        out, _ = proc.communicate(timeout=JOB_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            subprocess.run(["scancel", job_id], timeout=30)
            proc.kill()
    log = _log(demo, job_id)
    assert proc.returncode == 0, f"job {job_id} exited {proc.returncode}:\n{out}\n{log[-5000:]}"
    assert f"job {job_id} attempt 2] start" in log, log[-3000:]
    assert "is killed by signal" not in log, log[-5000:]  # no loader worker died of the SIGTERM
    train_log = (run_dir / "train.log").read_text()
    stopped = re.findall(r"stopped by signal (?:SIGTERM|\(on another rank\)) after step (\d+); checkpoint written",
                         train_log)
    resumed = re.findall(r"resumed from \S+step_(\d+)\.pt", train_log)
    assert len(stopped) == 1 and [int(s) for s in resumed] == [int(stopped[0])], train_log[-3000:]
    assert 2 <= int(stopped[0]) < STEPS, train_log[-3000:]
    assert _results(run_dir)["world_size"] == 2
    assert _train_steps(run_dir) == list(range(1, STEPS + 1))
    _assert_same_weights(run_dir, reference)


@pytest.mark.parametrize("relative", [False, True], ids=["absolute", "relative"])
def test_script_submitted_from_another_folder_finds_the_repository(demo, tmp_path, relative):
    """sbatch /path/to/ran-bench/slurm/ran92_8gpu.sh (or ../../path/to/...) from elsewhere: the repository
    comes from SLURM's record of the job, whose Command= keeps a relative path relative. Without GPUs
    and SMOKE the job then stops at common.sh's own check."""
    env = {k: v for k, v in _job_env(demo / "data", tmp_path / "run").items() if k not in ("SMOKE", "RAN_BENCH_REPO")}
    script = REPO / "slurm" / "ran92_8gpu.sh"
    proc = subprocess.run(["sbatch", "--gres=none", f"--output={tmp_path}/%x-%j.out", "--wait",
                           os.path.relpath(script, tmp_path) if relative else str(script)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    job_id = re.search(r"Submitted batch job (\d+)", proc.stdout).group(1)
    log = _log(tmp_path, job_id)
    assert proc.returncode == 2, log
    assert "no GPUs allocated (SLURM_GPUS_ON_NODE is unset)" in log, log  # common.sh was found and ran


def test_submit_to_a_partition_the_cluster_lacks_is_a_clear_error(demo, tmp_path, capsys, monkeypatch):
    from ran_bench.cli import main as cli

    monkeypatch.chdir(REPO)
    run_dir = tmp_path / "run"
    rc = cli(["submit", "--config", "configs/demo.yaml", "--gpus-per-node", "0", "--time", "10",
              "--partition", "no-such-partition", "--run-dir", str(run_dir), f"data.root={demo / 'data'}"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "error: sbatch refused the job:" in err and "invalid partition" in err.lower(), err
    assert not run_dir.exists()


def _submit(demo: Path, run_dir: Path, capsys) -> submitit.SlurmJob:  # noqa: F821
    import submitit

    from ran_bench.cli import main as cli

    rc = cli(["submit", "--config", "configs/demo.yaml", "--nodes", "1", "--gpus-per-node", "0",
              "--tasks-per-node", "2", "--time", "30", "--run-dir", str(run_dir),
              f"data.root={demo / 'data'}", *SMOKE_OVERRIDES])
    out = capsys.readouterr().out
    assert rc == 0, out
    job_id = re.search(r"submitted job (\d+)", out).group(1)
    assert f"{run_dir}/submitit/{job_id}_0_log.out" in out  # where to look
    return submitit.SlurmJob(folder=run_dir / "submitit", job_id=job_id, tasks=(0, 1))


def test_submit_runs_two_ranks_to_the_end(demo, reference, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(REPO)
    run_dir = demo / "runs" / "submitted"
    job = _submit(demo, run_dir, capsys)
    outputs = job.results()  # waits; raises if a task failed
    assert outputs[0]["world_size"] == 2 and outputs[0]["steps"] == STEPS and outputs[1] is None
    assert _results(run_dir)["world_size"] == 2
    assert (run_dir / "submitit" / f"{job.job_id}_1_log.out").is_file()


def test_submit_preempted_job_requeues_resumes_and_completes(demo, reference, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(REPO)
    run_dir = demo / "runs" / "preempted"
    job = _submit(demo, run_dir, capsys)
    try:
        _wait_for(run_dir / "checkpoints" / "step_00000002.pt", "the first checkpoint")
        job._interrupt()  # submitit's preemption: SIGTERM, then its USR2
        outputs = job.results()
    finally:
        if not job.done():
            job.cancel()
    assert outputs[0]["steps"] == STEPS and outputs[0]["world_size"] == 2
    resumed = re.findall(r"resumed from \S+step_(\d+)\.pt", (run_dir / "train.log").read_text())
    assert len(resumed) == 1 and 2 <= int(resumed[0]) < STEPS, resumed
    task0_log = "".join((run_dir / "submitit" / f"{job.job_id}_0_log.{ext}").read_text() for ext in ("out", "err"))
    for line in ["this job is preempted", "trainer exit status 75; requeueing", f"Requeued job {job.job_id}",
                 "rank 0 of 2, main ", "attempt 2"]:
        assert line in task0_log, f"{line!r} not in:\n{task0_log[-3000:]}"
    _assert_same_weights(run_dir, reference)
