#!/usr/bin/env bash
# Start a single-node SLURM cluster with accounting, plus a key-only sshd, all on loopback.
#
# For tests and CI: `sudo scripts/slurm/start_local_cluster.sh [STATE_DIR]` (default /tmp/ddr-slurm).
# Idempotent: packages are installed only when missing, configs are rewritten with the same content,
# and a daemon that is already running is left alone. Run as root (Debian/Ubuntu, apt).
#
# What it starts (all bound to 127.0.0.1):
#   munged           generated key (the package's, else a fresh one)
#   MariaDB          system datadir, --bind-address=127.0.0.1, DB user `slurm` with a generated password
#   slurmdbd         accounting on MariaDB (dagster-slurm needs sacct: without accounting it cannot tell
#                    a crashed job from a finished one)
#   slurmctld/slurmd one node named after this host, partition `debug`, no GPUs, no cgroups
#   sshd             port 2222, key only; authorized key generated under STATE_DIR/ssh/
#
# Prints the DDR_SLURM_* variables to use (eval-able lines) at the end.
set -euo pipefail
# A failing command never ends this script silently: name the line and the command.
trap 'echo "start_local_cluster.sh: line ${LINENO}: \`${BASH_COMMAND}\` failed (exit $?)" >&2' ERR

STATE_DIR="${1:-${DDR_SLURM_STATE_DIR:-/tmp/ddr-slurm}}"
SSH_PORT="${DDR_SLURM_SSH_PORT:-2222}"
CLUSTER_NAME="${DDR_SLURM_CLUSTER_NAME:-ddrlocal}"
PARTITION="${DDR_SLURM_PARTITION_NAME:-debug}"
HOST="$(hostname -s)"
NCPU="$(nproc)"
# Leave ~10 % of the memory to the OS so --mem requests up to RealMemory can be scheduled.
REAL_MEMORY_MB="$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)"

if [[ "$(id -u)" -ne 0 ]]; then
  echo "start_local_cluster.sh must run as root (it installs packages and starts system daemons)" >&2
  exit 2
fi

T0=$(date +%s.%N)
elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}'; }
log() { echo "[ddr-slurm +$(elapsed)s] $*" >&2; }

wait_for() {  # wait_for <seconds> <description> <command...>
  local limit=$1 what=$2; shift 2
  local deadline=$(( $(date +%s) + limit ))
  until "$@" >/dev/null 2>&1; do
    if (( $(date +%s) >= deadline )); then
      echo "timed out after ${limit}s waiting for ${what}; logs are in ${STATE_DIR}/log/" >&2
      tail -n 20 "${STATE_DIR}"/log/*.log /var/log/mysql/ddr-mariadb.log >&2 2>/dev/null || true
      exit 1
    fi
    sleep 0.3
  done
}

pid_alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

mkdir -p "${STATE_DIR}"/{log,run,ssh,spool/slurmctld,spool/slurmd}
chmod 700 "${STATE_DIR}"
RUN="${STATE_DIR}/run"
LOGS="${STATE_DIR}/log"

# ---------------------------------------------------------------- packages
PACKAGES=(slurm-wlm slurmdbd munge mariadb-server openssh-server)
missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if (( ${#missing[@]} )); then
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >"${LOGS}/apt.log" 2>&1 \
    || { tail -n 30 "${LOGS}/apt.log" >&2; exit 1; }
fi
log "packages present"

# ---------------------------------------------------------------- munge
if [[ ! -s /etc/munge/munge.key ]]; then
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
fi
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
chmod 755 /run/munge
if ! pid_alive /run/munge/munged.pid; then
  runuser -u munge -- /usr/sbin/munged --force
fi
wait_for 15 "munged" sh -c 'munge -n | unmunge'
log "munge up"

# ---------------------------------------------------------------- MariaDB (loopback only)
if [[ ! -d /var/lib/mysql/mysql ]]; then
  mariadb-install-db --user=mysql --datadir=/var/lib/mysql >"${LOGS}/mariadb-install.log" 2>&1
fi
# mysqld runs as `mysql`, which cannot write into the root-only STATE_DIR: pid and log stay in system dirs
mkdir -p /run/mysqld /var/log/mysql && chown mysql:mysql /run/mysqld /var/log/mysql
if ! mysqladmin ping --silent >/dev/null 2>&1; then
  nohup mysqld_safe --bind-address=127.0.0.1 --pid-file=/run/mysqld/mysqld.pid \
    --log-error=/var/log/mysql/ddr-mariadb.log >/dev/null 2>&1 &
  touch "${RUN}/mariadb.started-by-ddr"
fi
wait_for 60 "MariaDB" mysqladmin ping --silent
DB_PASSWORD_FILE="${STATE_DIR}/db_password"
if [[ ! -s "${DB_PASSWORD_FILE}" ]]; then
  (umask 077; head -c 24 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' >"${DB_PASSWORD_FILE}")
fi
DB_PASSWORD="$(cat "${DB_PASSWORD_FILE}")"
mysql -u root <<SQL
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '${DB_PASSWORD}';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '${DB_PASSWORD}';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
SQL
log "MariaDB up"

# ---------------------------------------------------------------- slurm configs
mkdir -p /etc/slurm
umask 022
# (no slurm.conf yet on a machine that never had Slurm configured: an empty checksum, not a failed pipeline)
OLD_CONF_SUM=""
[[ -f /etc/slurm/slurm.conf ]] && OLD_CONF_SUM="$(md5sum </etc/slurm/slurm.conf)"
cat >/etc/slurm/slurm.conf <<CONF
# Written by ddr scripts/slurm/start_local_cluster.sh: one node, loopback, accounting on.
ClusterName=${CLUSTER_NAME}
SlurmctldHost=${HOST}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SlurmctldPidFile=${RUN}/slurmctld.pid
SlurmdPidFile=${RUN}/slurmd.pid
SlurmctldLogFile=${LOGS}/slurmctld.log
SlurmdLogFile=${LOGS}/slurmd.log
StateSaveLocation=${STATE_DIR}/spool/slurmctld
SlurmdSpoolDir=${STATE_DIR}/spool/slurmd
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=256
# Finished jobs leave slurmctld quickly; sacct (accounting) is the source of truth afterwards.
MinJobAge=30
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/linux
# Sample every task each second and kill a step over its --mem (without cgroups this is how memory is
# enforced; the job log then says "Exceeded job memory limit", as on a cgroup cluster's OUT_OF_MEMORY).
JobAcctGatherFrequency=task=1
JobAcctGatherParams=OverMemoryKill
JobCompType=jobcomp/none
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=${HOST} NodeAddr=127.0.0.1 CPUs=${NCPU} RealMemory=${REAL_MEMORY_MB} State=UNKNOWN
PartitionName=${PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF

cat >/etc/slurm/slurmdbd.conf <<CONF
# Written by ddr scripts/slurm/start_local_cluster.sh
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=root
PidFile=${RUN}/slurmdbd.pid
LogFile=${LOGS}/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=${DB_PASSWORD}
StorageLoc=slurm_acct_db
CONF
chmod 600 /etc/slurm/slurmdbd.conf   # slurmdbd refuses a readable file (it holds the DB password)

# ---------------------------------------------------------------- slurmdbd, cluster, slurmctld, slurmd
if ! pid_alive "${RUN}/slurmdbd.pid"; then
  /usr/sbin/slurmdbd
fi
wait_for 60 "slurmdbd" sacctmgr -n list cluster
if ! sacctmgr -n -P list cluster format=cluster | grep -qx "${CLUSTER_NAME}"; then
  sacctmgr -i add cluster "${CLUSTER_NAME}" >/dev/null
fi
log "slurmdbd up, cluster ${CLUSTER_NAME} registered"

if ! pid_alive "${RUN}/slurmctld.pid"; then
  /usr/sbin/slurmctld
elif [[ "$(md5sum </etc/slurm/slurm.conf)" != "${OLD_CONF_SUM}" ]]; then
  scontrol reconfigure && log "slurm.conf changed: daemons reconfigured"
fi
wait_for 60 "slurmctld" scontrol ping
if ! pid_alive "${RUN}/slurmd.pid"; then
  /usr/sbin/slurmd
fi
node_ready() { sinfo -h -n "${HOST}" -o %T | grep -Eq '^(idle|mixed|allocated)'; }
wait_for 60 "node ${HOST} to be idle" node_ready
log "slurmctld + slurmd up, node ${HOST} $(sinfo -h -n "${HOST}" -o %T)"

# ---------------------------------------------------------------- sshd on 127.0.0.1:${SSH_PORT}, key only
SSH_DIR="${STATE_DIR}/ssh"
[[ -f "${SSH_DIR}/host_ed25519_key" ]] || ssh-keygen -q -t ed25519 -N '' -f "${SSH_DIR}/host_ed25519_key"
[[ -f "${SSH_DIR}/id_ed25519" ]] || ssh-keygen -q -t ed25519 -N '' -C "ddr-slurm-local" -f "${SSH_DIR}/id_ed25519"
cp "${SSH_DIR}/id_ed25519.pub" "${SSH_DIR}/authorized_keys"
chmod 600 "${SSH_DIR}/authorized_keys" "${SSH_DIR}/id_ed25519" "${SSH_DIR}/host_ed25519_key"
cat >"${SSH_DIR}/sshd_config" <<CONF
# Written by ddr scripts/slurm/start_local_cluster.sh
ListenAddress 127.0.0.1
Port ${SSH_PORT}
HostKey ${SSH_DIR}/host_ed25519_key
PidFile ${RUN}/sshd.pid
AuthorizedKeysFile ${SSH_DIR}/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
# the authorized key lives under /tmp (world-writable): StrictModes would reject the path
StrictModes no
# dagster-slurm uploads payloads over SFTP
Subsystem sftp /usr/lib/openssh/sftp-server
LogLevel INFO
CONF
mkdir -p /run/sshd && chmod 755 /run/sshd
/usr/sbin/sshd -t -f "${SSH_DIR}/sshd_config"
if ! pid_alive "${RUN}/sshd.pid"; then
  /usr/sbin/sshd -f "${SSH_DIR}/sshd_config" -E "${LOGS}/sshd.log"
fi
ssh_ok() {
  ssh -p "${SSH_PORT}" -i "${SSH_DIR}/id_ed25519" -o BatchMode=yes -o StrictHostKeyChecking=no \
    -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR root@127.0.0.1 true
}
wait_for 30 "sshd on 127.0.0.1:${SSH_PORT}" ssh_ok
log "sshd up on 127.0.0.1:${SSH_PORT}; cluster ready"

# ---------------------------------------------------------------- pre-deployed env for dagster-slurm
# dagster-slurm's pre_deployed_env_path=P runs jobs with P/env/bin/python after `source P/activate.sh`.
# On this one-machine cluster P/env is a link to the project's venv (DDR_SLURM_VENV, default <repo>/.venv,
# as `make setup` creates it: ddr installed editable, so jobs run this checkout's code). The venv must
# import ddr_core (with torch) and dagster_pipes; otherwise no DDR_SLURM_ENV_PATH is printed and the
# SLURM tests skip, saying why.
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${DDR_SLURM_VENV:-${REPO}/.venv}"
ENV_LINE=""
if [[ ! -x "${VENV}/bin/python" ]]; then
  log "WARNING: no venv at ${VENV} (run \`make setup\` first, or set DDR_SLURM_VENV): no pre-deployed env"
elif ! "${VENV}/bin/python" -c "import ddr_core.cluster_payload, dagster_pipes, torch" >"${LOGS}/env-check.log" 2>&1; then
  log "WARNING: ${VENV} cannot import ddr_core/dagster_pipes/torch (see ${LOGS}/env-check.log): no pre-deployed env"
else
  mkdir -p "${STATE_DIR}/env-ddr"
  ln -sfn "${VENV}" "${STATE_DIR}/env-ddr/env"
  # CPU threads = the job's CPUs (torch would otherwise spin one thread per core of the machine)
  printf 'source %q\nexport OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"\n' "${VENV}/bin/activate" \
    >"${STATE_DIR}/env-ddr/activate.sh"
  ENV_LINE="export DDR_SLURM_ENV_PATH=${STATE_DIR}/env-ddr"
fi

cat <<ENV
${ENV_LINE}
export DDR_SLURM_HOST_KEY_CHECKING=off
export DDR_SLURM_HOST=127.0.0.1
export DDR_SLURM_PORT=${SSH_PORT}
export DDR_SLURM_USER=root
export DDR_SLURM_KEY_PATH=${SSH_DIR}/id_ed25519
export DDR_SLURM_PARTITION=${PARTITION}
export DDR_SLURM_CPUS=1
export DDR_SLURM_MEM=2G
export DDR_SLURM_TIME=00:20:00
export DDR_SLURM_POLL_INTERVAL=1
ENV
