#!/usr/bin/env bash
# Stop what scripts/slurm/start_local_cluster.sh started (by its pid files), leaving packages and data.
# `sudo scripts/slurm/stop_local_cluster.sh [STATE_DIR] [--purge]`: --purge also deletes STATE_DIR
# (keys, logs, slurm state). Idempotent: a daemon that is not running is skipped.
set -uo pipefail

STATE_DIR="${DDR_SLURM_STATE_DIR:-/tmp/ddr-slurm}"
PURGE=0
for arg in "$@"; do
  case "$arg" in
    --purge) PURGE=1 ;;
    *) STATE_DIR="$arg" ;;
  esac
done
RUN="${STATE_DIR}/run"

stop_pidfile() {  # stop_pidfile <name> <pidfile>
  local name=$1 pidfile=$2 pid
  [[ -f "$pidfile" ]] || return 0
  pid="$(cat "$pidfile")"
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then
      echo "${name} (pid ${pid}) ignored SIGTERM for 10 s; sending SIGKILL" >&2
      kill -KILL "$pid" 2>/dev/null
    fi
    echo "stopped ${name} (pid ${pid})"
  fi
  rm -f "$pidfile"
}

# dagster-slurm keeps an SSH ControlMaster (ControlPersist=10m) per user@host:port; close ours first
SSH_PORT="${DDR_SLURM_SSH_PORT:-2222}"
for sock in "${HOME}"/.ssh/dagster-slurm/cm-*@127.0.0.1:"${SSH_PORT}"; do
  [[ -S "$sock" ]] || continue
  ssh -o ControlPath="$sock" -O exit -p "${SSH_PORT}" 127.0.0.1 2>/dev/null && echo "closed SSH master ${sock}"
done
stop_pidfile sshd "${RUN}/sshd.pid"
stop_pidfile slurmd "${RUN}/slurmd.pid"
stop_pidfile slurmctld "${RUN}/slurmctld.pid"
stop_pidfile slurmdbd "${RUN}/slurmdbd.pid"
if [[ -f "${RUN}/mariadb.started-by-ddr" ]]; then
  if mysqladmin ping --silent >/dev/null 2>&1; then
    mysqladmin -u root shutdown && echo "stopped MariaDB"   # mysqld_safe exits once mysqld is gone
  fi
  rm -f "${RUN}/mariadb.started-by-ddr"
fi
if [[ -f /run/munge/munged.pid ]] && kill -0 "$(cat /run/munge/munged.pid)" 2>/dev/null; then
  stop_pidfile munged /run/munge/munged.pid
fi
if (( PURGE )); then
  rm -rf "${STATE_DIR}" && echo "removed ${STATE_DIR}"
fi
