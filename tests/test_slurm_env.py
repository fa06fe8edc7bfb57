"""Rank, node and address logic of `ran_bench.slurm_env` as a function of SLURM's variables, and the
sbatch scripts' overrides, requeue decision and repository lookup with stand-ins for srun (no cluster)."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from conftest import REPO
from ran_bench.slurm_env import (
    PORT_BASE,
    PORT_SPAN,
    SlurmEnvError,
    expand_nodelist,
    launcher_env,
    main_port,
    node_address,
    placement,
    tasks_on_node,
    torch_env,
)
from ran_bench.slurm_env import main as slurm_env_main

# A task of a 2-node batch job (one launcher per node), as srun sets it on the second node.
TWO_NODES_SECOND = {
    "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_NUM_NODES": "2",
    "SLURM_NODEID": "1", "SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_NTASKS": "2",
    "SLURM_TASKS_PER_NODE": "1(x2)",
}


def fake_resolve(name: str) -> str:
    return {"gpu07": "10.0.0.7", "gpu08": "10.0.0.8", "n1": "127.0.0.1"}[name]


@pytest.mark.parametrize("nodelist, expected", [
    ("n[1-2]", ["n1", "n2"]),
    ("node17", ["node17"]),
    ("gpu[01-03,7],cpu5", ["gpu01", "gpu02", "gpu03", "gpu7", "cpu5"]),  # zero padding kept
    ("a[1-2]-ib[0-1]", ["a1-ib0", "a1-ib1", "a2-ib0", "a2-ib1"]),
])
def test_expand_nodelist(nodelist, expected):
    assert expand_nodelist(nodelist) == expected


def test_expand_nodelist_rejects_malformed():
    with pytest.raises(SlurmEnvError, match=r"n\[1-"):
        expand_nodelist("n[1-")


@pytest.mark.parametrize("spec, node, expected", [("2(x3),1", 0, 2), ("2(x3),1", 2, 2), ("2(x3),1", 3, 1),
                                                  ("8", 0, 8), ("4,4,2", 2, 2)])
def test_tasks_on_node(spec, node, expected):
    assert tasks_on_node(spec, node) == expected


def test_tasks_on_node_errors():
    with pytest.raises(SlurmEnvError, match="SLURM_TASKS_PER_NODE"):
        tasks_on_node("2(x3),1", 4)
    with pytest.raises(SlurmEnvError, match="cannot parse"):
        tasks_on_node("2[x3]", 0)


def test_launcher_env_of_second_node_points_at_first_node():
    p = placement(TWO_NODES_SECOND, resolve=fake_resolve)
    assert launcher_env(p) == {"NODE_RANK": "1", "NUM_NODES": "2", "MAIN_ADDR": "10.0.0.7",
                               "MAIN_PORT": str(main_port(4242))}
    first = placement({**TWO_NODES_SECOND, "SLURM_NODEID": "0", "SLURM_PROCID": "0"}, resolve=fake_resolve)
    assert (first.node_rank, first.main_addr, first.main_port) == (0, "10.0.0.7", p.main_port)


def test_torch_env_one_task_per_gpu():
    # 2 nodes x 4 tasks (submitit's layout): global task 5 is the second task of the second node.
    env = {"SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_NODEID": "1", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8",
           "SLURM_TASKS_PER_NODE": "4(x2)"}
    assert torch_env(placement(env, resolve=fake_resolve)) == {
        "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "NODE_RANK": "1",
        "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": str(main_port(77))}


def test_main_port_is_per_job_and_outside_the_ephemeral_range():
    assert main_port(4242) == main_port(4242)  # every node, and the requeued job (same id)
    assert len({main_port(j) for j in range(1000, 1100)}) == 100  # neighbouring jobs sharing a node
    for job in (0, 1, 4242, 10**7 + 3):
        assert PORT_BASE <= main_port(job) < PORT_BASE + PORT_SPAN <= 32768


def test_placement_errors_name_the_variable():
    with pytest.raises(SlurmEnvError, match="SLURM_JOB_ID"):
        placement({}, resolve=fake_resolve)
    with pytest.raises(SlurmEnvError, match="SLURM_JOB_NUM_NODES=3"):
        placement({**TWO_NODES_SECOND, "SLURM_JOB_NUM_NODES": "3"}, resolve=fake_resolve)
    with pytest.raises(SlurmEnvError, match="SLURM_NODEID=2"):
        placement({**TWO_NODES_SECOND, "SLURM_NODEID": "2"}, resolve=fake_resolve)
    with pytest.raises(SlurmEnvError, match="SLURM_PROCID=2"):
        placement({**TWO_NODES_SECOND, "SLURM_PROCID": "2"}, resolve=fake_resolve)


def test_node_address_prefers_slurm_nodeaddr():
    line = ("NodeName=n1 Arch=x86_64 CoresPerSocket=1 CPUAlloc=0 CPUTot=2 NodeAddr=10.1.2.3 NodeHostName=box "
            "Version=22.05.8 State=IDLE")
    assert node_address("n1", run=lambda cmd: line) == "10.1.2.3"


def test_node_address_falls_back_to_the_resolver_then_fails_clearly():
    assert node_address("localhost", run=lambda cmd: None) == "127.0.0.1"
    with pytest.raises(SlurmEnvError, match="no-such-node.invalid"):
        node_address("no-such-node.invalid", run=lambda cmd: None)


def test_cli_prints_shell_assignments_using_scontrol(tmp_path, monkeypatch, capsys):
    """What slurm/launch_node.sh evals (`python -m ran_bench.slurm_env`), with a stand-in scontrol."""
    scontrol = tmp_path / "scontrol"
    scontrol.write_text('#!/bin/sh\n[ "$3" = gpu07 ] && echo "NodeName=gpu07 NodeAddr=10.9.8.7 NodeHostName=x"\n')
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    for key, value in TWO_NODES_SECOND.items():
        monkeypatch.setenv(key, value)
    assert slurm_env_main([]) == 0
    script = capsys.readouterr().out + 'echo "$NODE_RANK $NUM_NODES $MAIN_ADDR $MAIN_PORT"'
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["1", "2", "10.9.8.7", str(main_port(4242))]


def test_cli_outside_slurm_fails_with_a_clear_message(monkeypatch, capsys):
    for key in list(os.environ):
        if key.startswith("SLURM_"):
            monkeypatch.delenv(key)
    assert slurm_env_main([]) == 1
    err = capsys.readouterr().err
    assert "SLURM_JOB_ID" in err and "inside a SLURM job" in err


# The sbatch scripts themselves (slurm/common.sh, slurm/launch_node.sh) with stand-ins for srun,
# scontrol and the Python that runs accelerate: how they pass the overrides and how they decide
# between success, requeue and failure from what each node's launcher did. The real thing, on a
# real cluster, is in test_slurm.py.
FAKE_SRUN = """#!/bin/bash
# Like srun: one task per node with its SLURM_NODEID; exits with the highest status of the tasks.
echo "$@" > "$FAKE/srun_args"
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((k = 0; k < SLURM_JOB_NUM_NODES; k++)); do SLURM_NODEID=$k SLURMD_NODENAME=n$((k + 1)) "$@" & pids+=($!); done
rc=0; for p in "${pids[@]}"; do wait "$p"; r=$?; (( r > rc )) && rc=$r; done
exit $rc
"""
FAKE_SCONTROL = """#!/bin/bash
echo "$@" >> "$FAKE/scontrol_calls"
[ "$1 $2" = "show job" ] && [ -n "${FAKE_COMMAND:-}" ] && echo "   Command=$FAKE_COMMAND"
exit 0
"""
FAKE_PYTHON = """#!/bin/bash
# `python -m ran_bench.slurm_env` and `python -m accelerate.commands.launch ...` of one node.
if [ "$2" = ran_bench.slurm_env ]; then
  printf 'NODE_RANK=%s\\nNUM_NODES=%s\\nMAIN_ADDR=127.0.0.1\\nMAIN_PORT=20077\\n' "$SLURM_NODEID" "$SLURM_JOB_NUM_NODES"
  exit 0
fi
printf '%s\\n' "$@" > "$FAKE/launch_args_$SLURM_NODEID"
outcome=FAKE_RC_$SLURM_NODEID
[ "${!outcome:-0}" = kill ] && kill -KILL $PPID  # the node's launch_node.sh dies with it
exit "${!outcome:-0}"
"""


@pytest.fixture
def fake_job(tmp_path):
    """Run slurm/ran92_8gpu.sh as a 2-node SLURM job would, with stand-ins; returns run(**env)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("slurm", "ran_bench", "configs", "launch"):
        (repo / name).symlink_to(REPO / name)
    # A file that `data.test_sizes=[224,320]` matches as a glob pattern, in the jobs' working folder.
    (repo / "data.test_sizes=2").touch()
    fake = tmp_path / "fake"
    fake.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("python", FAKE_PYTHON)):
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)

    def run(cwd=tmp_path, **env):
        base = {"PATH": f"{fake}:{os.environ['PATH']}", "HOME": str(tmp_path), "FAKE": str(fake),
                "PYTHON": str(fake / "python"), "SLURM_JOB_ID": "77", "SLURM_JOB_NAME": "ran92",
                "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_SUBMIT_DIR": str(repo),
                "GPUS_PER_NODE": "1", "DATA_ROOT": "/data/image net", "RUN_DIR": str(tmp_path / "run"),
                "OVERRIDES": " data.test_sizes=[224,320]\n  optim.lr=0.1 "}
        proc = subprocess.run(["bash", str(REPO / "slurm" / "ran92_8gpu.sh")], env={**base, **env}, cwd=cwd,
                              capture_output=True, text=True, timeout=60)
        calls = (fake / "scontrol_calls").read_text() if (fake / "scontrol_calls").exists() else ""
        return proc.returncode, proc.stdout + proc.stderr, calls

    run.fake, run.repo = fake, repo
    return run


def test_script_passes_overrides_as_words_and_one_launcher_per_node(fake_job):
    rc, log, calls = fake_job()
    assert rc == 0, log
    assert "finished" in log and "requeue" not in calls
    for node in (0, 1):
        args = (fake_job.fake / f"launch_args_{node}").read_text().splitlines()
        assert args[args.index("--machine_rank") + 1] == str(node)
        # A space in the data root and brackets that match a file: passed as written.
        assert args[args.index("--run-dir") + 2:] == [
            "data.root=/data/image net", "data.test_sizes=[224,320]", "optim.lr=0.1"]
    # srun must not inherit the job's task count (sbatch --ntasks-per-node=8 would start 8 per node).
    assert "--nodes=2 --ntasks=2 --ntasks-per-node=1" in (fake_job.fake / "srun_args").read_text()


@pytest.mark.parametrize("node_outcomes, expected_rc, message", [
    # Time limit: every node's trainers checkpointed and exited 75.
    (("75", "75"), 0, "exit 75 on every node): requeueing job 77"),
    # Node 0 failed (a bad data.root); srun stopped node 1, whose trainers checkpointed: srun's own
    # status is the 75 of node 1, and this must not requeue.
    (("2", "75"), 2, "failed: node 0 (n1) exited with 2"),
    # Node 1's launcher was killed before it could record its status.
    (("75", "kill"), 137, "failed: node(s) 1 recorded no exit status"),
    # Node 1 failed with 3; node 0's trainers hung in a collective and were killed before recording
    # anything (srun's own status is then 137): node 1's failure is the cause, not node 0.
    (("kill", "3"), 3, "failed: node 1 (n2) exited with 3"),
])
def test_script_requeues_only_when_every_node_stopped_at_a_checkpoint(fake_job, node_outcomes, expected_rc,
                                                                        message):
    rc, log, calls = fake_job(FAKE_RC_0=node_outcomes[0], FAKE_RC_1=node_outcomes[1])
    assert rc == expected_rc, log
    assert message in log, log
    assert ("requeue 77" in calls) == (expected_rc == 0), calls
    assert "No such file" not in log, log  # a node without a record is reported, not a bash error


def test_script_stops_requeueing_after_max_requeues(fake_job):
    rc, log, calls = fake_job(FAKE_RC_0="75", FAKE_RC_1="75", SLURM_RESTART_COUNT="3", MAX_REQUEUES="3")
    assert rc == 75, log
    assert "requeued 3 times (MAX_REQUEUES=3): not requeueing again" in log
    assert "requeue" not in calls


def test_script_finds_the_repository_when_submitted_from_elsewhere(fake_job, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # sbatch /path/to/ran-bench/slurm/ran92_8gpu.sh from another folder: SLURM's record of the job
    # names the submitted script.
    rc, log, _ = fake_job(cwd=elsewhere, SLURM_SUBMIT_DIR=str(elsewhere),
                          FAKE_COMMAND=str(fake_job.repo / "slurm" / "ran92_8gpu.sh"))
    assert rc == 0 and "finished" in log, log
    # A relative path, as given to sbatch, is relative to the submission folder:
    # `sbatch ../repo/slurm/ran92_8gpu.sh` from elsewhere, and `cd slurm; sbatch ran92_8gpu.sh`.
    for submit_dir, command in ((elsewhere, "../repo/slurm/ran92_8gpu.sh"),
                                (fake_job.repo / "slurm", "ran92_8gpu.sh")):
        rc, log, _ = fake_job(cwd=submit_dir, SLURM_SUBMIT_DIR=str(submit_dir), FAKE_COMMAND=command,
                              RUN_DIR=str(tmp_path / "run" / command.replace("/", "_")))
        assert rc == 0 and "finished" in log, (command, log)
    # Neither the submission folder nor SLURM's record lead to it: say what to do.
    rc, log, _ = fake_job(cwd=elsewhere, SLURM_SUBMIT_DIR=str(elsewhere))
    assert rc == 2, log
    assert "submit from the repository root" in log and "RAN_BENCH_REPO" in log
    assert "No such file" not in log


# Features newer than bash 4.2 (RHEL/CentOS 7 clusters), with the form to use instead. The
# scripts run there under `set -u`, where bash < 4.4 treats an empty array as unset.
BASH_44_FEATURES = {
    r"\$\{[^}]*@[QEPAa]\}": "${x@Q} and other @ transformations (4.4): printf %q",
    r"\bmapfile\s+(-\w+\s+)*-d\b|\breadarray\s+(-\w+\s+)*-d\b": "mapfile -d (4.4)",
    r"\bwait\s+-n\b": "wait -n (4.3)",
    r"\b(local|declare|typeset)\s+(-\w+\s+)*-\w*n\w*\s": "namerefs, local -n (4.3)",
    r"\+=\(\"\$\{\w+\[@\]\}\"\)": 'a+=("${b[@]}") aborts on an empty b under set -u before 4.4: '
                                   'a+=(${b[@]+"${b[@]}"})',
}


@pytest.mark.parametrize("script", sorted((REPO / "slurm").glob("*.sh")), ids=lambda p: p.name)
def test_scripts_run_on_bash_4_2(script):
    text = script.read_text()
    found = [f"{script.name}:{text.count(chr(10), 0, m.start()) + 1}: {why}"
             for pattern, why in BASH_44_FEATURES.items() for m in re.finditer(pattern, text)]
    assert not found, found


def test_script_runs_with_no_overrides(fake_job):
    # SCRIPT_OVERRIDES unset and OVERRIDES empty: the empty word lists add nothing.
    rc, log, _ = fake_job(OVERRIDES="")
    assert rc == 0, log
    args = (fake_job.fake / "launch_args_0").read_text().splitlines()
    assert args[args.index("--run-dir") + 2:] == ["data.root=/data/image net"]
    assert "overrides: data.root=/data/image\\ net\n" in log, log  # printf %q's quoting, one line


def test_every_sbatch_script_finds_the_repository_the_same_way():
    # The tests above run ran92_8gpu.sh; the other scripts carry the same lookup (sbatch runs a copy
    # of the script, so it cannot be sourced from a shared file before the repository is found).
    def lookup(name):
        text = (REPO / "slurm" / name).read_text()
        return text[text.index("REPO=${RAN_BENCH_REPO"):text.index('source "$REPO/slurm/common.sh"')]

    assert lookup("ran56_8gpu.sh") == lookup("ran92_8gpu.sh") == lookup("ran92_4x8gpu.sh")
