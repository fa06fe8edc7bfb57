"""Rank, node and address logic of `ran_bench.slurm_env` as a function of SLURM's variables (no cluster)."""

from __future__ import annotations

import os
import subprocess

import pytest

from ran_bench.slurm_env import main as slurm_env_main
from ran_bench.slurm_env import (PORT_BASE, PORT_SPAN, SlurmEnvError, expand_nodelist, launcher_env, main_port,
                                 node_address, placement, tasks_on_node, torch_env)

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
