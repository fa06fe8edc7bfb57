"""`ran-bench submit`: the training run as a SLURM job, submitted with submitit.

    ran-bench submit --config configs/attention92.yaml --nodes 4 --gpus-per-node 8 \\
        --partition gpu --time 48:00:00 data.root=/data/imagenet

One SLURM task per GPU; each task becomes one torch.distributed rank (RANK = SLURM_PROCID,
MASTER_ADDR = the first node's address, MASTER_PORT from the job id: `ran_bench.slurm_env`) and
runs `python -m ran_bench train --config ... --run-dir ...` as a child process, so the trainer
sees the same environment as under torchrun.

Time-outs and preemption use submitit's checkpoint-and-requeue (`submitit.helpers.Checkpointable`):
SLURM sends submitit's signal (USR2) `SIGNAL_DELAY_S` seconds before the time limit; task 0's
`checkpoint()` asks its trainer to stop (SIGUSR1: every rank finishes the step, one checkpoint is
written, the trainers exit 75), waits for it, and hands submitit a resubmission of the same
callable, which requeues the job. The requeued tasks start the same command with the same run
directory, and the trainer resumes from its newest checkpoint. The trainer processes ignore USR2
(it is submitit's), and act on the SIGTERM that SLURM sends when it preempts or cancels a job.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import submitit
from submitit.core.utils import FailedJobError

from ran_bench.config import load_config, validate
from ran_bench.errors import InputError
from ran_bench.models import model_info
from ran_bench.preemption import REQUEUE_EXIT_CODE
from ran_bench.slurm_env import placement, torch_env

# Seconds between submitit's pre-timeout signal and the time limit: time to finish a step and
# write a checkpoint of Attention-92 with its optimizer state on a slow shared file system.
SIGNAL_DELAY_S = 180
# How long task 0 waits for its trainer to checkpoint and exit before requeueing anyway.
STOP_TIMEOUT_S = 150
# Time-outs (not preemptions) after which submitit stops requeueing: a 530k-step ImageNet run
# over 24-hour limits needs a handful; more means the run is stuck.
MAX_TIMEOUT_REQUEUES = 30


def parse_time(text: str) -> int:
    """SLURM time limit -> whole minutes (rounded up). SLURM's forms: "MM", "MM:SS", "HH:MM:SS",
    "D-HH", "D-HH:MM", "D-HH:MM:SS"."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not m:
        raise InputError(f"--time {text!r}: expected minutes, HH:MM:SS or D-HH:MM:SS")
    days, a, b, c = (int(g) if g is not None else None for g in m.groups())
    if days is None and b is None:
        return a
    if days is None:
        seconds = a * 60 + b if c is None else (a * 60 + b) * 60 + c
    else:
        seconds = ((days * 24 + a) * 60 + (b or 0)) * 60 + (c or 0)
    return max(1, -(-seconds // 60))


class TrainingJob(submitit.helpers.Checkpointable):
    """What every SLURM task runs: one trainer process as torch.distributed rank SLURM_PROCID."""

    def __init__(self, command: list[str], run_dir: str, cpu: bool) -> None:
        self.command = command
        self.run_dir = run_dir
        self.cpu = cpu
        self._child: subprocess.Popen | None = None
        self._got_term = False
        self._requeueing = False  # set by checkpoint(): submitit is requeueing this job

    def __getstate__(self) -> dict[str, Any]:  # what submitit pickles, also on requeue
        return {"command": self.command, "run_dir": self.run_dir, "cpu": self.cpu}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    def __call__(self) -> dict | None:
        job_env = submitit.JobEnvironment()
        env = {**os.environ, **torch_env(placement())}
        if self.cpu:
            env["CUDA_VISIBLE_DEVICES"] = ""
        print(f"[ran-bench submit] {job_env}: rank {env['RANK']} of {env['WORLD_SIZE']}, main "
              f"{env['MASTER_ADDR']}:{env['MASTER_PORT']}, attempt {int(os.environ.get('SLURM_RESTART_COUNT', 0)) + 1}"
              f"\n[ran-bench submit] running: {shlex.join(self.command)}", flush=True)
        # SIGTERM: SLURM ends the job (the trainer gets it too and checkpoints). SIGUSR1: someone
        # asked the step to checkpoint (`scancel --signal=USR1`); without a handler it would kill
        # this process. submitit's own signal stays submitit's.
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGUSR1, lambda signum, frame: None)
        self._child = subprocess.Popen(self.command, env=env, preexec_fn=_ignore_submitit_signal)
        rc = self._wait_child()
        if rc == 0:
            if job_env.global_rank != 0:
                return None
            return json.loads((Path(self.run_dir) / "results.json").read_text())
        if rc != REQUEUE_EXIT_CODE:
            raise RuntimeError(f"ran-bench train exited with {rc} on rank {env['RANK']}; see {self.run_dir}/train.log "
                               "and this task's log")
        # The trainers checkpointed and stopped.
        if self._got_term:  # SLURM is cancelling, preempting or requeueing: its decision
            raise SystemExit(REQUEUE_EXIT_CODE)
        if job_env.global_rank == 0:  # stopped on a USR1: requeue through submitit's own path
            signal.raise_signal(_submitit_signal())
        # Other ranks wait for task 0's requeue to end this attempt; returning would record a result.
        deadline = time.monotonic() + STOP_TIMEOUT_S + 60
        while time.monotonic() < deadline:
            time.sleep(1)
        raise RuntimeError(f"the trainer stopped for a requeue that did not come; resubmit with --run-dir "
                           f"{self.run_dir} to resume")

    def checkpoint(self, *args: Any, **kwargs: Any):
        """Called by submitit on task 0 at its pre-timeout or preemption signal: stop the trainer
        at a checkpoint, then resubmit this same callable (it resumes from the run directory)."""
        self._requeueing = True  # the SIGTERM that `scontrol requeue` brings is expected now
        child = self._child
        if child is not None and child.poll() is None:
            print(f"[ran-bench submit] asking the trainer to checkpoint and stop (up to {STOP_TIMEOUT_S} s)",
                  flush=True)
            child.send_signal(signal.SIGUSR1)
            deadline = time.monotonic() + STOP_TIMEOUT_S
            while child.poll() is None and time.monotonic() < deadline:
                time.sleep(0.5)
            print(f"[ran-bench submit] trainer exit status {child.poll()}; requeueing to resume from "
                  f"{self.run_dir}", flush=True)
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)

    def _wait_child(self) -> int:
        # poll() rather than wait(): checkpoint() polls the same child from a signal handler, and
        # a blocking wait() would hold the lock it needs.
        assert self._child is not None
        while (rc := self._child.poll()) is None:
            time.sleep(0.5)
        return rc

    def _on_term(self, signum, frame) -> None:
        self._got_term = True
        if not self._requeueing and self._child is not None and self._child.poll() is not None:
            raise SystemExit(REQUEUE_EXIT_CODE)  # nothing left to wait for


def _submitit_signal() -> signal.Signals:
    return getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG)


def _ignore_submitit_signal() -> None:
    """In the trainer child, before exec: submitit's signal (USR2 unless SUBMITIT_PREEMPT_SIGNAL
    says otherwise) reaches every process of the step and would kill the trainer by default; an
    ignored signal stays ignored across exec."""
    signal.signal(_submitit_signal(), signal.SIG_IGN)


# `--slurm` keys (submitit's or sbatch's, - or _) that set what submit's own flags set: taking them
# would silently replace the flag's value and bypass the world-size check against the config.
OWN_FLAGS = {
    "nodes": "--nodes", "ntasks_per_node": "--tasks-per-node (or --gpus-per-node)",
    "tasks_per_node": "--tasks-per-node (or --gpus-per-node)", "ntasks": "--nodes and --tasks-per-node",
    "gpus_per_node": "--gpus-per-node", "gpus_per_task": "--gpus-per-node", "num_gpus": "--gpus-per-node",
    "gpus": "--gpus-per-node", "gres": "--gpus-per-node", "cpus_per_task": "--cpus-per-task",
    "time": "--time", "timeout_min": "--time", "partition": "--partition", "job_name": "--name", "name": "--name",
}


def slurm_parameters(items: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """`--slurm KEY=VALUE` items -> (submitit's slurm_* parameters, other sbatch options).

    Values get the type submitit's parameter has: true/false for flags (`exclusive=true` is
    `#SBATCH --exclusive`, false leaves it out), whole numbers for counts, and a list for the
    list parameters, one item per repetition (`--slurm setup="module load cuda"`; srun_args is
    split like a shell line). A key submitit does not know is written as `#SBATCH --KEY=VALUE`,
    next to the job's own --requeue. Keys that submit's own flags set (OWN_FLAGS) are refused."""
    from submitit.slurm.slurm import _make_sbatch_string

    signature = inspect.signature(_make_sbatch_string).parameters
    known = submitit.SlurmExecutor._valid_parameters() - {"additional_parameters"}
    params: dict[str, Any] = {}
    sbatch_options: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise InputError(f"--slurm {item!r} is not KEY=VALUE (e.g. --slurm account=myproject)")
        own = key.replace("-", "_")
        if own in OWN_FLAGS and (own != "gres" or "gpu" in text.lower()):  # other generic resources are fine
            raise InputError(f"--slurm {item!r}: use submit's {OWN_FLAGS[own]} instead (it sets the same sbatch "
                             "option, and the config is checked against the resulting world size)")
        if key == "additional_parameters":
            raise InputError(f"--slurm {item!r}: give each sbatch option as its own --slurm KEY=VALUE (e.g. "
                             "--slurm reservation=mine); options submitit does not know become #SBATCH lines")
        annotation = str(signature[key].annotation) if key in known else "bool | int | str"
        if "List" in annotation or "Iterable" in annotation:
            params.setdefault(f"slurm_{key}", []).extend(shlex.split(text) if key == "srun_args" else [text])
            continue
        value: Any = text
        if "bool" in annotation and text.lower() in ("true", "false"):
            value = text.lower() == "true"
        elif "int" in annotation and re.fullmatch(r"-?\d+", text):
            value = int(text)
        if key not in known:
            sbatch_options[key] = value  # False (e.g. requeue=false) is dropped by plan()
        elif value is False and signature[key].default is not True:  # a flag turned off: no #SBATCH line
            params.pop(f"slurm_{key}", None)
        else:
            params[f"slurm_{key}"] = value
    return params, sbatch_options


def plan(args: argparse.Namespace) -> tuple[dict[str, Any], list[str], Path]:
    """Executor parameters, the command every task runs and the run directory, after checking the
    config and overrides (so a typo fails here, not in the queue)."""
    if args.nodes < 1:
        raise InputError(f"--nodes must be >= 1, got {args.nodes}")
    if args.gpus_per_node < 0:
        raise InputError(f"--gpus-per-node must be >= 0, got {args.gpus_per_node}")
    tasks = args.tasks_per_node or args.gpus_per_node or 1
    if args.gpus_per_node and tasks != args.gpus_per_node:
        raise InputError(f"--tasks-per-node {tasks} with --gpus-per-node {args.gpus_per_node}: the trainer runs one "
                         "process per GPU, so leave --tasks-per-node out when using GPUs")
    timeout_min = parse_time(args.time)
    config = Path(args.config)
    run_dir = Path(args.run_dir or Path("runs") / config.stem).absolute()
    name = args.name or f"ran-bench-{config.stem}"
    for flag, value in [("--slurm", item) for item in args.slurm] + [
            ("--partition", args.partition), ("--name", name), ("--run-dir", str(run_dir))]:
        _refuse_control_characters(flag, value)
    extra, sbatch_options = slurm_parameters(args.slurm)
    cfg = load_config(config, args.overrides)
    validate(cfg, str(config), world_size=args.nodes * tasks)
    model_info(cfg.model.name)  # an unknown model: the error lists the known ones
    command = [sys.executable, "-m", "ran_bench", "train", "--config", str(config.absolute()),
               "--run-dir", str(run_dir), *args.overrides]
    params: dict[str, Any] = {
        "name": name,
        "nodes": args.nodes,
        "tasks_per_node": tasks,
        "cpus_per_task": args.cpus_per_task or (8 if args.gpus_per_node else 1),
        "timeout_min": timeout_min,
        "slurm_signal_delay_s": SIGNAL_DELAY_S,
        "slurm_additional_parameters": {k: v for k, v in {"requeue": True, **sbatch_options}.items() if v is not False},
    }
    if args.gpus_per_node:
        params["gpus_per_node"] = args.gpus_per_node
    if args.partition:
        params["slurm_partition"] = args.partition
    params.update(extra)
    return params, command, run_dir


def _refuse_control_characters(flag: str, value: str | None) -> None:
    """Refuse a value for the sbatch script that holds a control character: a newline would end its
    line there and start another, an #SBATCH option or a command of its own."""
    bad = next((c for c in value or "" if ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        raise InputError(f"{flag} {value!r}: holds the control character {bad!r}; values written into the sbatch "
                         "script must be one line of printable text")


def submit(args: argparse.Namespace):
    """Submit the run; returns the submitit Job."""
    params, command, run_dir = plan(args)
    try:
        executor = submitit.AutoExecutor(folder=run_dir / "submitit", cluster="slurm",
                                         slurm_max_num_timeout=MAX_TIMEOUT_REQUEUES)
    except RuntimeError as e:  # submitit: 'Could not detect "srun"'
        raise InputError(f"no SLURM here ({e}); run on a login node of the cluster, or use --dry-run") from None
    executor.update_parameters(**params)
    folder = run_dir / "submitit"
    created = [p for p in (run_dir, folder) if not p.exists()]  # outermost first
    before = set(folder.iterdir()) if folder.exists() else set()
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        return executor.submit(TrainingJob(command, str(run_dir), cpu=args.gpus_per_node == 0))
    except FailedJobError as e:
        # Leave nothing behind for a job that does not exist: a new run directory would look
        # like a run to resume, and its submission files would be mistaken for a job's.
        if created:
            shutil.rmtree(created[0], ignore_errors=True)
        else:
            for path in set(folder.iterdir()) - before:
                path.unlink(missing_ok=True)
        reason = str(e).strip() or "no message"
        raise InputError(f"sbatch refused the job: {reason}. Check --partition, --time, --gpus-per-node and the "
                         "--slurm options against the cluster (sinfo, sacctmgr show assoc user=$USER), that this "
                         "is a login node of the cluster (SLURM_CONF), and compare with --dry-run") from None


def main(args: argparse.Namespace) -> int:
    if args.dry_run:
        params, command, run_dir = plan(args)
        print("would submit with submitit.AutoExecutor(cluster='slurm', folder="
              f"{run_dir / 'submitit'}, slurm_max_num_timeout={MAX_TIMEOUT_REQUEUES}):")
        for key, value in params.items():
            print(f"  {key} = {value!r}")
        print(f"each of the {params['nodes'] * params['tasks_per_node']} tasks runs, as torch.distributed rank "
              "SLURM_PROCID (MASTER_ADDR: the first node):")
        print(f"  {shlex.join(command)}")
        return 0
    job = submit(args)
    print(f"submitted job {job.job_id}")
    print(f"  run directory: {job.paths.folder.parent}")
    print(f"  task logs:     {job.paths.stdout}  (task 0; other tasks: {job.job_id}_<task>_log.out)")
    print(f"  errors:        {job.paths.stderr}")
    print(f"  follow:        squeue -j {job.job_id}; tail -f {job.paths.stdout}")
    return 0
