#!/usr/bin/env bash
# Stop the single-node Slurm started by .ci/slurm-up.sh: by PID file, in reverse start order,
# never by process name. Safe to run when nothing is running.
set -uo pipefail
SLURM_DIR=${SLURM_DIR:-/tmp/facedis-slurm}
for f in "$SLURM_DIR/slurmd.pid" "$SLURM_DIR/slurmctld.pid" "$SLURM_DIR/slurmdbd.pid" \
         "$SLURM_DIR/mariadb.pid" /run/munge/munged.pid; do
  [ -s "$f" ] || continue
  p=$(cat "$f")
  if kill "$p" 2>/dev/null; then
    for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$p" 2>/dev/null && kill -9 "$p" 2>/dev/null
  fi
  rm -f "$f"
done
echo "slurm-down: stopped (state kept in $SLURM_DIR)" >&2
