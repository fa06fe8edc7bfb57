"""`ran-bench submit` without a cluster: --dry-run, argument checks, and the checkpoint hook that
stops the trainer before submitit requeues (the submission itself is tested in test_slurm.py)."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import submitit

from conftest import REPO
from ran_bench.cli import main as cli
from ran_bench.submit import REQUEUE_EXIT_CODE, TrainingJob, parse_time


@pytest.fixture
def no_sbatch(tmp_path, monkeypatch):
    """sbatch/srun stand-ins that leave a mark if anything tries to submit."""
    marker = tmp_path / "submitted"
    for name in ("sbatch", "srun"):
        tool = tmp_path / name
        tool.write_text(f"#!/bin/sh\ntouch {marker}\necho 'Submitted batch job 1'\n")
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.chdir(REPO)
    return marker


def test_dry_run_prints_the_job_and_submits_nothing(no_sbatch, tmp_path, capsys):
    rc = cli(["submit", "--config", "configs/attention92.yaml", "--nodes", "2", "--gpus-per-node", "8",
              "--partition", "gpu", "--time", "2-00:00:00", "--run-dir", str(tmp_path / "run"), "--slurm",
              "account=proj", "--dry-run", "data.root=/data/imagenet", "optim.global_batch_size=512"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert not no_sbatch.exists()
    for line in ["nodes = 2", "tasks_per_node = 8", "gpus_per_node = 8", "timeout_min = 2880",
                 "slurm_partition = 'gpu'", "slurm_account = 'proj'", "slurm_additional_parameters = {'requeue': True}",
                 "slurm_signal_delay_s = 180", f"folder={tmp_path / 'run' / 'submitit'}", "each of the 16 tasks runs"]:
        assert line in out, f"{line!r} not in:\n{out}"
    command = out.strip().splitlines()[-1].split()
    assert command[1:5] == ["-m", "ran_bench", "train", "--config"]
    assert command[5] == str(REPO / "configs" / "attention92.yaml")
    assert command[6:] == ["--run-dir", str(tmp_path / "run"), "data.root=/data/imagenet",
                           "optim.global_batch_size=512"]


def test_dry_run_cpu_smoke_layout(no_sbatch, tmp_path, capsys):
    rc = cli(["submit", "--config", "configs/demo.yaml", "--gpus-per-node", "0", "--tasks-per-node", "2",
              "--time", "10", "--run-dir", str(tmp_path / "run"), "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "tasks_per_node = 2" in out and "cpus_per_task = 1" in out and "gpus_per_node" not in out


@pytest.mark.parametrize("args, message", [
    # 256 images over 16 GPUs x 32 per GPU does not split: caught before anything is queued.
    (["--config", "configs/attention92.yaml", "--nodes", "2", "data.root=/x"], "optim.global_batch_size (256)"),
    (["--config", "configs/attention92.yaml"], "data.root is not set"),
    (["--config", "configs/nope.yaml"], "configs/nope.yaml: config file not found"),
    (["--config", "configs/demo.yaml", "--tasks-per-node", "4"], "leave --tasks-per-node out"),
    (["--config", "configs/demo.yaml", "--slurm", "account"], "--slurm 'account' is not KEY=VALUE"),
    (["--config", "configs/demo.yaml", "--time", "soon"], "--time 'soon'"),
    (["--config", "configs/demo.yaml", "--slurm", "additional_parameters={'mail_type': 'END'}"],
     "give each sbatch option as its own --slurm KEY=VALUE"),
    # What submit's own flags set: a --slurm value would replace it unseen by the world-size check.
    (["--config", "configs/demo.yaml", "--slurm", "nodes=4"], "--slurm 'nodes=4': use submit's --nodes instead"),
    (["--config", "configs/demo.yaml", "--slurm", "ntasks-per-node=2"], "use submit's --tasks-per-node"),
    (["--config", "configs/demo.yaml", "--slurm", "ntasks=16"], "use submit's --nodes and --tasks-per-node"),
    (["--config", "configs/demo.yaml", "--slurm", "gres=gpu:4"], "use submit's --gpus-per-node"),
    (["--config", "configs/demo.yaml", "--slurm", "gpus_per_node=4"], "use submit's --gpus-per-node"),
    (["--config", "configs/demo.yaml", "--slurm", "cpus_per_task=4"], "use submit's --cpus-per-task"),
    (["--config", "configs/demo.yaml", "--slurm", "time=10"], "use submit's --time"),
    (["--config", "configs/demo.yaml", "--slurm", "partition=gpu"], "use submit's --partition"),
    (["--config", "configs/demo.yaml", "--slurm", "job_name=x"], "use submit's --name"),
])
def test_bad_arguments_fail_before_submitting(no_sbatch, capsys, args, message):
    assert cli(["submit", *args, "--dry-run"]) == 2
    assert message in capsys.readouterr().err
    assert not no_sbatch.exists()


@pytest.mark.parametrize("args, flag, value, char", [
    (["--slurm", "account=proj\n#SBATCH --exclusive"], "--slurm", "account=proj\n#SBATCH --exclusive", "\n"),
    (["--slurm", "setup=module load cuda\nrm -rf ~"], "--slurm", "setup=module load cuda\nrm -rf ~", "\n"),
    (["--partition", "gpu\r#SBATCH --qos=high"], "--partition", "gpu\r#SBATCH --qos=high", "\r"),
    (["--name", "demo\n#SBATCH --exclusive"], "--name", "demo\n#SBATCH --exclusive", "\n"),
    (["--run-dir", "runs/a\nb"], "--run-dir", str(REPO / "runs" / "a\nb"), "\n"),
])
def test_a_control_character_never_reaches_the_sbatch_script(no_sbatch, capsys, args, flag, value, char):
    """A newline in a value would end its #SBATCH line and start another option or a command."""
    assert cli(["submit", "--config", "configs/demo.yaml", "--gpus-per-node", "0", *args, "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert captured.err == (f"error: {flag} {value!r}: holds the control character {char!r}; values written into "
                            "the sbatch script must be one line of printable text\n")
    assert captured.out == "" and not no_sbatch.exists()


def test_slurm_options_get_submitits_types_in_the_sbatch_file(no_sbatch, tmp_path, capsys):
    """`--slurm KEY=VALUE` is text on the command line; submitit needs a flag for exclusive, lists for
    setup and srun_args, and unknown options next to the job's own --requeue."""
    from submitit.slurm.slurm import _make_sbatch_string

    rc = cli(["submit", "--config", "configs/demo.yaml", "--gpus-per-node", "0", "--time", "10",
              "--run-dir", str(tmp_path / "run"), "--dry-run", "--slurm", "exclusive=true",
              "--slurm", "setup=module load cuda", "--slurm", "setup=export NCCL_DEBUG=WARN",
              "--slurm", "srun_args=--cpu-bind=none --mpi=pmix", "--slurm", "reservation=mine",
              "--slurm", "signal_delay_s=240"])
    out = capsys.readouterr().out
    assert rc == 0, out
    for line in ["slurm_exclusive = True", "slurm_setup = ['module load cuda', 'export NCCL_DEBUG=WARN']",
                 "slurm_srun_args = ['--cpu-bind=none', '--mpi=pmix']", "slurm_signal_delay_s = 240",
                 "slurm_additional_parameters = {'requeue': True, 'reservation': 'mine'}"]:
        assert line in out, f"{line!r} not in:\n{out}"
    # The same parameters through submitit's own sbatch writer.
    from ran_bench.submit import slurm_parameters

    params, options = slurm_parameters(["exclusive=true", "setup=module load cuda", "srun_args=--cpu-bind=none",
                                        "reservation=mine"])
    text = _make_sbatch_string(command="true", folder=tmp_path, additional_parameters={"requeue": True, **options},
                               **{k.removeprefix("slurm_"): v for k, v in params.items()})
    lines = text.splitlines()
    assert "#SBATCH --exclusive" in lines and "#SBATCH --requeue" in lines and "#SBATCH --reservation=mine" in lines
    assert "module load cuda" in lines
    assert any(x.startswith("srun ") and " --cpu-bind=none " in x for x in lines), text


def test_slurm_flag_set_to_false_writes_no_line(no_sbatch, tmp_path, capsys):
    rc = cli(["submit", "--config", "configs/demo.yaml", "--gpus-per-node", "0", "--time", "10",
              "--run-dir", str(tmp_path / "run"), "--dry-run", "--slurm", "exclusive=false",
              "--slurm", "requeue=false"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "slurm_exclusive" not in out and "slurm_additional_parameters = {}" in out


def test_slurm_flag_whose_default_is_true_set_to_false_is_kept(no_sbatch, tmp_path, capsys):
    """submitit's use_srun defaults to True: dropping a false would turn it back on."""
    rc = cli(["submit", "--config", "configs/demo.yaml", "--gpus-per-node", "0", "--time", "10",
              "--run-dir", str(tmp_path / "run"), "--dry-run", "--slurm", "use_srun=false",
              "--slurm", "gres=nvme:1"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "slurm_use_srun = False" in out, out
    assert "slurm_gres = 'nvme:1'" in out, out  # a generic resource that is not a GPU is the user's


def test_refused_submission_is_an_error_and_leaves_no_run_directory(tmp_path, monkeypatch, capsys):
    """sbatch refusing the job (a bad partition, no cluster configuration) is bad input, not a crash."""
    for name, text in (("sbatch", "#!/bin/sh\necho 'sbatch: error: invalid partition specified: nope' >&2\nexit 1\n"),
                       ("srun", "#!/bin/sh\nexit 0\n")):
        (tmp_path / name).write_text(text)
        (tmp_path / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.chdir(REPO)
    run_dir = tmp_path / "run"
    rc = cli(["submit", "--config", "configs/demo.yaml", "--gpus-per-node", "0", "--time", "10",
              "--partition", "nope", "--run-dir", str(run_dir)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "sbatch refused the job: sbatch: error: invalid partition specified: nope" in err
    assert "--partition" in err and "Traceback" not in err
    assert not run_dir.exists()
    # An existing run directory (a resume) keeps what it had, and gets nothing new.
    (run_dir / "submitit").mkdir(parents=True)
    (run_dir / "submitit" / "12_0_log.out").write_text("an earlier job's log")
    assert cli(["submit", "--config", "configs/demo.yaml", "--gpus-per-node", "0", "--time", "10",
                "--partition", "nope", "--run-dir", str(run_dir)]) == 2
    assert [p.name for p in (run_dir / "submitit").iterdir()] == ["12_0_log.out"]


@pytest.mark.parametrize("text, minutes", [("90", 90), ("30:00", 30), ("30:01", 31), ("1:30:00", 90),
                                           ("2-00", 2880), ("2-12:30", 3630), ("3-00:00:00", 4320)])
def test_parse_time_reads_slurm_time_formats(text, minutes):
    assert parse_time(text) == minutes


def test_checkpoint_stops_the_trainer_then_resubmits_the_same_job(tmp_path):
    """submitit calls checkpoint() on its pre-timeout/preemption signal: the trainer (here a stand-in
    that exits 75 on SIGUSR1, as ran-bench train does) must have stopped before it returns."""
    trainer = ("import signal, sys, time\n"
               f"signal.signal(signal.SIGUSR1, lambda *a: sys.exit({REQUEUE_EXIT_CODE}))\n"
               "print('ready', flush=True)\n"
               "time.sleep(120)\n")
    job = TrainingJob(["python", "-m", "ran_bench", "train", "--run-dir", str(tmp_path)], str(tmp_path), cpu=True)
    job._child = subprocess.Popen([sys.executable, "-c", trainer], stdout=subprocess.PIPE, text=True)
    assert job._child.stdout.readline().strip() == "ready"
    t0 = time.monotonic()
    delayed = job.checkpoint()
    assert job._child.poll() == REQUEUE_EXIT_CODE and time.monotonic() - t0 < 30
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    again = pickle.loads(pickle.dumps(delayed.function))  # what submitit stores for the requeued job
    assert isinstance(again, TrainingJob) and again.command == job.command and again._child is None


def test_trainer_ignores_submitits_signal(tmp_path):
    """The trainer child must survive submitit's USR2 (it reaches every process of the step)."""
    from ran_bench.submit import _ignore_submitit_signal

    child = subprocess.Popen([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(2)"],
                             stdout=subprocess.PIPE, text=True, preexec_fn=_ignore_submitit_signal)
    assert child.stdout.readline().strip() == "up"
    child.send_signal(signal.SIGUSR2)
    assert child.wait(timeout=30) == 0
