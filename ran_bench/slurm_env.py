"""Where a process sits in a SLURM job, for torch.distributed: node rank, ranks, main address and port.

Two launch styles use it:
- the sbatch scripts in `slurm/` start one launcher per node (`accelerate launch`, which starts
  one process per GPU); each launcher needs its machine rank, the number of machines and the main
  node's address and port. `python -m ran_bench.slurm_env` prints them as shell assignments
  (NODE_RANK, NUM_NODES, MAIN_ADDR, MAIN_PORT), which the scripts `eval`;
- `ran-bench submit` (submitit) starts one task per GPU; each task turns its SLURM ids into
  RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT for the trainer (`torch_env`).

Every value is a function of SLURM's environment variables, so all tasks agree without talking:
the main node is the first of SLURM_JOB_NODELIST (expanded with submitit's parser, the one its
JobEnvironment uses), and the port is derived from the job id. The main node's address comes from
SLURM's own record (`scontrol show node NAME -o`, NodeAddr), then the system resolver, never from
`hostname`: node names need not resolve in DNS, and several slurmd can share one host.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass

# Main ports are taken from [PORT_BASE, PORT_BASE + PORT_SPAN): below Linux's ephemeral range
# (32768-60999), so an outgoing connection cannot already hold it, and far from the usual 29500.
PORT_BASE = 20000
PORT_SPAN = 12000


class SlurmEnvError(RuntimeError):
    """Not inside a SLURM job, or SLURM's variables are inconsistent."""


@dataclass(frozen=True)
class SlurmPlacement:
    """This task's place in its job."""

    job_id: int
    nodes: tuple[str, ...]  # the job's nodes, in SLURM's order
    node_rank: int  # SLURM_NODEID: index of this node in `nodes`
    rank: int  # SLURM_PROCID: global task rank
    local_rank: int  # SLURM_LOCALID: task rank on this node
    world_size: int  # SLURM_NTASKS: tasks in the job
    local_world_size: int  # tasks on this node
    main_addr: str  # address of nodes[0]
    main_port: int

    @property
    def num_nodes(self) -> int:
        return len(self.nodes)


def expand_nodelist(nodelist: str) -> list[str]:
    """`gpu[01-03,7],cpu5` -> ["gpu01", "gpu02", "gpu03", "gpu7", "cpu5"] (SLURM's hostlist syntax)."""
    from submitit.slurm.slurm import SlurmParseException, _parse_node_list

    try:
        nodes = _parse_node_list(nodelist)
    except SlurmParseException as e:
        raise SlurmEnvError(f"cannot parse the SLURM node list {nodelist!r}: {e}") from None
    if not nodes or any(not n for n in nodes):
        raise SlurmEnvError(f"cannot parse the SLURM node list {nodelist!r}")
    return nodes


def tasks_on_node(tasks_per_node: str, node_rank: int) -> int:
    """Tasks on node `node_rank` from SLURM_TASKS_PER_NODE, whose syntax is `2(x3),1`: 2 tasks
    on each of the first three nodes, then 1."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise SlurmEnvError(f"cannot parse SLURM_TASKS_PER_NODE={tasks_per_node!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    if not 0 <= node_rank < len(counts):
        raise SlurmEnvError(f"SLURM_TASKS_PER_NODE={tasks_per_node!r} has no entry for node {node_rank}")
    return counts[node_rank]


def main_port(job_id: int) -> int:
    """The rendezvous port of a job: the same on every node and after a requeue (same job id),
    different for jobs whose ids differ by less than PORT_SPAN, so two jobs sharing a node do not
    collide."""
    return PORT_BASE + job_id % PORT_SPAN


def _run(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def node_address(name: str, run: Callable[[list[str]], str | None] = _run) -> str:
    """Address other nodes reach node `name` at: its NodeAddr in SLURM's configuration, else what
    the resolver (`getent hosts`, i.e. NSS) gives for the name."""
    out = run(["scontrol", "show", "node", name, "-o"])
    m = re.search(r"(?:^|\s)NodeAddr=(\S+)", out or "")
    if m and m.group(1) not in ("(null)", "None"):
        return m.group(1)
    try:
        return socket.gethostbyname(name)
    except OSError:
        raise SlurmEnvError(f"cannot find the address of node {name!r}: `scontrol show node {name}` gave no "
                            "NodeAddr and the name does not resolve") from None


def _int(environ: Mapping[str, str], *names: str, default: int | None = None) -> int:
    for name in names:
        value = environ.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                raise SlurmEnvError(f"{name}={value!r} is not an integer") from None
    if default is None:
        raise SlurmEnvError(f"{' or '.join(names)} is not set: run this inside a SLURM job step (sbatch, srun)")
    return default


def placement(environ: Mapping[str, str] = os.environ,
              resolve: Callable[[str], str] = node_address) -> SlurmPlacement:
    """This task's placement from SLURM's environment variables (`environ`, os.environ by default).
    `resolve` maps the first node's name to its address."""
    job_id = _int(environ, "SLURM_JOB_ID", "SLURM_JOBID")
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if not nodelist:
        raise SlurmEnvError("SLURM_JOB_NODELIST is not set: run this inside a SLURM job step (sbatch, srun)")
    nodes = tuple(expand_nodelist(nodelist))
    num_nodes = _int(environ, "SLURM_JOB_NUM_NODES", "SLURM_NNODES", default=len(nodes))
    if num_nodes != len(nodes):
        raise SlurmEnvError(f"SLURM_JOB_NUM_NODES={num_nodes} but SLURM_JOB_NODELIST={nodelist!r} "
                            f"names {len(nodes)} nodes")
    node_rank = _int(environ, "SLURM_NODEID", default=0)
    if not 0 <= node_rank < num_nodes:
        raise SlurmEnvError(f"SLURM_NODEID={node_rank} is outside the job's {num_nodes} nodes")
    world_size = _int(environ, "SLURM_NTASKS", "SLURM_NPROCS", default=num_nodes)
    rank = _int(environ, "SLURM_PROCID", default=0)
    if not 0 <= rank < world_size:
        raise SlurmEnvError(f"SLURM_PROCID={rank} is outside the job's {world_size} tasks (SLURM_NTASKS)")
    tasks_per_node = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE")
    local_world_size = tasks_on_node(tasks_per_node, node_rank) if tasks_per_node else world_size // num_nodes
    return SlurmPlacement(job_id=job_id, nodes=nodes, node_rank=node_rank, rank=rank,
                          local_rank=_int(environ, "SLURM_LOCALID", default=0), world_size=world_size,
                          local_world_size=local_world_size, main_addr=resolve(nodes[0]),
                          main_port=main_port(job_id))


def launcher_env(p: SlurmPlacement) -> dict[str, str]:
    """What one launcher per node needs (`accelerate launch --machine_rank ...`)."""
    return {"NODE_RANK": str(p.node_rank), "NUM_NODES": str(p.num_nodes), "MAIN_ADDR": p.main_addr,
            "MAIN_PORT": str(p.main_port)}


def torch_env(p: SlurmPlacement) -> dict[str, str]:
    """torch.distributed's env:// variables when every SLURM task is one rank (submitit)."""
    return {"RANK": str(p.rank), "WORLD_SIZE": str(p.world_size), "LOCAL_RANK": str(p.local_rank),
            "LOCAL_WORLD_SIZE": str(p.local_world_size), "NODE_RANK": str(p.node_rank),
            "MASTER_ADDR": p.main_addr, "MASTER_PORT": str(p.main_port)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ran_bench.slurm_env",
        description="Print this SLURM task's launcher variables (NODE_RANK NUM_NODES MAIN_ADDR MAIN_PORT) as "
                    "shell assignments, for `eval \"$(python -m ran_bench.slurm_env)\"` in a job step.")
    parser.add_argument("--torch", action="store_true",
                        help="print torch.distributed's RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT "
                             "instead (one task per rank)")
    args = parser.parse_args(argv)
    try:
        p = placement()
    except SlurmEnvError as e:
        print(f"ran_bench.slurm_env: error: {e}", file=sys.stderr)
        return 1
    env = torch_env(p) if args.torch else launcher_env(p)
    print("\n".join(f"{k}={shlex.quote(v)}" for k, v in env.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
