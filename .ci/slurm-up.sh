#!/usr/bin/env bash
# Start a single-node Slurm cluster (slurmctld + slurmd + munge + slurmdbd/MariaDB, so sacct works)
# from Debian packages, as root, without systemd. Idempotent: installs packages only if missing and
# starts only the daemons that are not already running (liveness by PID file).
#
#   eval "$(.ci/slurm-up.sh)"      # exports SLURM_CONF in the calling shell
#
# Only the last line of stdout is meant for eval ("export SLURM_CONF=..."); progress goes to stderr.
# Env: SLURM_DIR (state/config/logs; default /tmp/facedis-slurm), SLURM_NODE_CPUS (CPUs Slurm may
# hand out on this node; default max(nproc, 4) so 2-task jobs and 4 single-CPU jobs fit on a
# 2-core CI machine), SLURM_KILL_WAIT (seconds between SIGTERM and SIGKILL; default 3),
# SLURM_CRED_EXPIRE (credential lifetime = how long a requeued job waits before it restarts; default 10).
# Re-running with a changed config restarts slurmctld/slurmd so the new settings apply.
# Stop with .ci/slurm-down.sh (by PID, never by name).
set -euo pipefail

SLURM_DIR=${SLURM_DIR:-/tmp/facedis-slurm}
HOST=$(hostname -s)              # SlurmctldHost and NodeName must equal the short host name
NCPU=$(nproc)
NODE_CPUS=${SLURM_NODE_CPUS:-$(( NCPU > 4 ? NCPU : 4 ))}
KILL_WAIT=${SLURM_KILL_WAIT:-3}
CRED_EXPIRE=${SLURM_CRED_EXPIRE:-10}   # also the delay before a requeued job may start again (Slurm default 120 s)
MEM_MB=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.8}' /proc/meminfo)
DB_SOCK="$SLURM_DIR/db/mysql.sock"
log() { echo "slurm-up: $*" >&2; }
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

if [ "$(id -u)" != 0 ]; then
  log "must run as root (it starts munged, MariaDB and the Slurm daemons)"; exit 1
fi

# ---------------------------------------------------------------- install (only what is missing)
need=()
command -v slurmctld >/dev/null 2>&1 || need+=(slurm-wlm)
command -v munged >/dev/null 2>&1 || [ -x /usr/sbin/munged ] || need+=(munge)
command -v slurmdbd >/dev/null 2>&1 || [ -x /usr/sbin/slurmdbd ] || need+=(slurmdbd)
command -v mariadbd >/dev/null 2>&1 || [ -x /usr/sbin/mariadbd ] || need+=(mariadb-server)
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  apt-get update >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}" >&2
fi
export PATH="$PATH:/usr/sbin:/sbin"

mkdir -p "$SLURM_DIR"/{state,spool,log,db} /run/munge
chown munge:munge /run/munge
[ -s /etc/munge/munge.key ] || { /usr/sbin/mungekey --create >&2 2>/dev/null || /usr/sbin/create-munge-key -f >&2; }

# ---------------------------------------------------------------- munge
if ! munge -n >/dev/null 2>&1; then
  log "starting munged"
  runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
  for _ in $(seq 50); do munge -n >/dev/null 2>&1 && break; sleep 0.1; done
fi

# ---------------------------------------------------------------- MariaDB + slurmdbd
if [ ! -d "$SLURM_DIR/db/data/mysql" ]; then
  log "initialising MariaDB in $SLURM_DIR/db/data"
  mariadb-install-db --no-defaults --user=root --datadir="$SLURM_DIR/db/data" \
    --auth-root-authentication-method=socket >"$SLURM_DIR/log/mariadb-install.log" 2>&1
fi
if ! alive "$SLURM_DIR/mariadb.pid"; then
  log "starting mariadbd"
  mariadbd --no-defaults --user=root --datadir="$SLURM_DIR/db/data" --socket="$DB_SOCK" \
    --pid-file="$SLURM_DIR/mariadb.pid" --bind-address=127.0.0.1 --port=3306 --skip-name-resolve \
    --innodb-buffer-pool-size=64M --log-error="$SLURM_DIR/log/mariadb.err" </dev/null >/dev/null 2>&1 &
fi
for _ in $(seq 150); do mariadb --no-defaults -S "$DB_SOCK" -uroot -e 'select 1' >/dev/null 2>&1 && break; sleep 0.2; done
mariadb --no-defaults -S "$DB_SOCK" -uroot <<SQL
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurmpw';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
FLUSH PRIVILEGES;
SQL

cat > "$SLURM_DIR/slurmdbd.conf" <<CONF
AuthType=auth/munge
DbdAddr=127.0.0.1
DbdHost=${HOST}
DbdPort=6819
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=3306
StorageUser=slurm
StoragePass=slurmpw
StorageLoc=slurm_acct_db
PidFile=${SLURM_DIR}/slurmdbd.pid
LogFile=${SLURM_DIR}/log/slurmdbd.log
CONF
chmod 600 "$SLURM_DIR/slurmdbd.conf"          # slurmdbd refuses a world-readable file

old_conf=$(cat "$SLURM_DIR/slurm.conf" 2>/dev/null || true)
cat > "$SLURM_DIR/slurm.conf" <<CONF
ClusterName=local
SlurmctldHost=${HOST}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=${CRED_EXPIRE}
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=5
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
ReturnToService=2
JobRequeue=1
KillWait=${KILL_WAIT}
SlurmdParameters=config_overrides
StateSaveLocation=${SLURM_DIR}/state
SlurmdSpoolDir=${SLURM_DIR}/spool
SlurmctldPidFile=${SLURM_DIR}/slurmctld.pid
SlurmdPidFile=${SLURM_DIR}/slurmd.pid
SlurmctldLogFile=${SLURM_DIR}/log/slurmctld.log
SlurmdLogFile=${SLURM_DIR}/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
MinJobAge=300
NodeName=${HOST} NodeAddr=127.0.0.1 CPUs=${NODE_CPUS} RealMemory=${MEM_MB} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP DefMemPerCPU=1000
CONF
export SLURM_CONF="$SLURM_DIR/slurm.conf"
if [ -n "$old_conf" ] && [ "$old_conf" != "$(cat "$SLURM_CONF")" ]; then
  log "slurm.conf changed: restarting slurmctld and slurmd"
  for f in "$SLURM_DIR/slurmd.pid" "$SLURM_DIR/slurmctld.pid"; do
    alive "$f" || continue
    p=$(cat "$f"); kill "$p"
    for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    rm -f "$f"
  done
fi

if ! alive "$SLURM_DIR/slurmdbd.pid"; then
  log "starting slurmdbd"
  /usr/sbin/slurmdbd             # no -f option: reads slurmdbd.conf next to $SLURM_CONF
fi
for _ in $(seq 150); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.2; done
if ! sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -qx local; then
  sacctmgr -i add cluster local >/dev/null 2>&1 || true
fi
if ! alive "$SLURM_DIR/slurmctld.pid"; then
  log "starting slurmctld"
  /usr/sbin/slurmctld
fi
if ! alive "$SLURM_DIR/slurmd.pid"; then
  log "starting slurmd"
  /usr/sbin/slurmd
fi
ok=0
for _ in $(seq 150); do
  if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then ok=1; break; fi
  sleep 0.2
done
if [ "$ok" != 1 ]; then
  log "node did not become ready; see $SLURM_DIR/log/"; sinfo >&2 || true; exit 1
fi
sinfo >&2
echo "$SLURM_CONF" > "$SLURM_DIR/SLURM_CONF"
echo "export SLURM_CONF=$SLURM_CONF"
