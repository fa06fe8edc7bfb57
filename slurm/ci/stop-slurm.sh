#!/bin/bash
# Stop the test cluster that slurm/ci/start-slurm.sh started in $P, by the daemons' pid files
# (never by name: other SLURM or MariaDB processes on the machine are left alone).
P=${P:-/tmp/ran-bench-slurm}
for f in $P/run/slurmd_*.pid $P/run/slurmctld.pid $P/run/slurmdbd.pid $P/mysql/mysqld.pid $P/munge/munged.pid; do
  [ -f "$f" ] || continue; pid=$(cat "$f"); kill "$pid" 2>/dev/null || continue
  for i in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  echo "stopped $(basename "$f" .pid) pid $pid"
done
