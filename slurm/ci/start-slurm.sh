#!/bin/bash
# A real SLURM cluster on this one machine, for the `slurm`-marked tests (CI's .ci/run calls it).
# SLURM 22.05 from Debian 12's packages: slurmctld, slurmd, slurmdbd + MariaDB (so `sacct`
# works, which submitit needs to see job states), munge; no systemd, no cgroups. Needs root.
#   P=/tmp/ran-bench-slurm NODES=2 bash slurm/ci/start-slurm.sh
#   export SLURM_CONF=$P/etc/slurm.conf      # then sinfo, sbatch, srun, sacct and submitit work
#   P=/tmp/ran-bench-slurm bash slurm/ci/stop-slurm.sh
# NODES=1 runs one slurmd named after the host; NODES=2 runs two slurmd daemons n1 and n2 on this
# host, so a 2-node job really gets SLURM_NODEID 0 and 1. Every node has all of the machine's
# CPUs and no GPUs. Idempotent: when the cluster in $P is already up with NODES idle-or-busy
# nodes it only prints `sinfo`; otherwise it stops what is left in $P and starts afresh.
set -euo pipefail
P=${P:-/tmp/ran-bench-slurm}; NODES=${NODES:-1}
H=$(hostname -s); N=$(nproc)
if [ "$NODES" = 1 ]; then NAMES=$H; else NAMES=$(seq -f 'n%g' 1 "$NODES" | tr '\n' ' '); fi
t0=$(date +%s%N); ts(){ echo "[start-slurm $(( ($(date +%s%N) - t0) / 1000000 )) ms] $*"; }
export SLURM_CONF=$P/etc/slurm.conf                         # every client and daemon must see it

if [ -f $P/run/slurmctld.pid ] && kill -0 "$(cat $P/run/slurmctld.pid)" 2>/dev/null \
   && [ "$(sinfo -h -N -o %N 2>/dev/null | sort -u | wc -l)" = "$NODES" ]; then
  sinfo; ts "already running in $P"; exit 0
fi
P=$P bash "$(dirname "$0")/stop-slurm.sh" >/dev/null 2>&1 || true
rm -rf "$P"

# Packages: skipped when already installed (a second run, or a prepared image).
if ! command -v slurmctld >/dev/null || ! command -v slurmdbd >/dev/null || ! command -v mariadbd >/dev/null \
   || ! command -v munged >/dev/null || ! command -v sbatch >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client slurmdbd munge mariadb-server >/dev/null
  ts "packages installed"
fi
PATH=$PATH:/usr/sbin

mkdir -p $P/{etc,state,log,run,munge,mysql}
for n in $NAMES; do mkdir -p $P/spool/slurmd_$n; done
chown munge:munge $P/munge; chmod 0755 $P/munge               # munged needs o+x on its socket dir
runuser -u munge -- mungekey --create --keyfile=$P/munge/munge.key
runuser -u munge -- /usr/sbin/munged --socket=$P/munge/munge.socket.2 --key-file=$P/munge/munge.key \
  --pid-file=$P/munge/munged.pid --log-file=$P/munge/munged.log --seed-file=$P/munge/munged.seed
ts "munged up"

# MariaDB for slurmdbd: without accounting `sacct` fails and submitit sees every job as UNKNOWN.
DB_PORT=${DB_PORT:-3306}; DBD_PORT=${DBD_PORT:-6819}
mariadb-install-db --no-defaults --datadir=$P/mysql/data --user=root >$P/log/mariadb-install.log 2>&1
setsid /usr/sbin/mariadbd --no-defaults --user=root --datadir=$P/mysql/data --socket=$P/mysql/mysqld.sock \
  --pid-file=$P/mysql/mysqld.pid --bind-address=127.0.0.1 --port=$DB_PORT --log-error=$P/log/mariadb.err \
  --innodb-buffer-pool-size=128M --innodb-lock-wait-timeout=900 </dev/null >/dev/null 2>&1 &
SQL="mariadb --no-defaults -S $P/mysql/mysqld.sock -uroot"
for i in $(seq 150); do $SQL -e 'select 1' >/dev/null 2>&1 && break; sleep 0.2; done
$SQL -e "DROP USER IF EXISTS ''@'localhost'; DROP USER IF EXISTS ''@'$H';
  CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurmpw'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
ts "mariadb up"

# AccountingStoragePass=<munge socket>: slurmctld ignores AuthInfo=socket= when it talks to
# slurmdbd. cred_expire=10 and sched_interval=2: otherwise a requeued job waits about 150 s.
cat > $P/etc/slurm.conf <<EOF
ClusterName=ci
SlurmctldHost=$H(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$P/munge/munge.socket.2,cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
AccountingStoragePass=$P/munge/munge.socket.2
JobCompType=jobcomp/none
MailProg=/bin/true
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
StateSaveLocation=$P/state
SlurmdSpoolDir=$P/spool/slurmd_%n
SlurmctldPidFile=$P/run/slurmctld.pid
SlurmdPidFile=$P/run/slurmd_%n.pid
SlurmctldLogFile=$P/log/slurmctld.log
SlurmdLogFile=$P/log/slurmd_%n.log
EOF
if [ "$NODES" = 1 ]; then
  echo "NodeName=$H NodeAddr=127.0.0.1 CPUs=$N RealMemory=1000 State=UNKNOWN" >> $P/etc/slurm.conf
else
  i=0; for n in $NAMES; do i=$((i+1))
    echo "NodeName=$n NodeHostname=$H NodeAddr=127.0.0.1 Port=$((17000+i)) CPUs=$N RealMemory=1000 State=UNKNOWN" >> $P/etc/slurm.conf
  done
fi
echo "PartitionName=debug Nodes=$(echo $NAMES | tr ' ' ',') Default=YES MaxTime=INFINITE State=UP" >> $P/etc/slurm.conf
cat > $P/etc/slurmdbd.conf <<EOF
AuthType=auth/munge
AuthInfo=socket=$P/munge/munge.socket.2
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
LogFile=$P/log/slurmdbd.log
PidFile=$P/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurmpw
StorageLoc=slurm_acct_db
EOF
chmod 600 $P/etc/slurmdbd.conf                                # slurmdbd refuses a world-readable file
/usr/sbin/slurmdbd
for i in $(seq 150); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.2; done
ts "slurmdbd up"
/usr/sbin/slurmctld -i
if [ "$NODES" = 1 ]; then /usr/sbin/slurmd; else for n in $NAMES; do /usr/sbin/slurmd -N $n; done; fi
for i in $(seq 150); do [ "$(sinfo -h -N -o %t 2>/dev/null | grep -cx idle)" = "$NODES" ] && break; sleep 0.2; done
if [ "$(sinfo -h -N -o %t 2>/dev/null | grep -cx idle)" != "$NODES" ]; then
  sinfo -N || true; echo "start-slurm: the $NODES node(s) did not become idle; see $P/log/" >&2; exit 1
fi
sinfo; ts "cluster idle: export SLURM_CONF=$SLURM_CONF"
