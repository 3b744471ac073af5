#!/usr/bin/env bash
# Start a PostgreSQL server on loopback for the lab deployment's tests (deploy/lab/, docs/DEPLOYMENT.md).
#
# For tests and CI: `sudo scripts/start_local_postgres.sh [STATE_DIR]` (default /tmp/ddr-postgres).
# Idempotent: Debian's `postgresql` is installed only when missing, the cluster is created once, and a
# server that is already running is left alone. Run as root (Debian/Ubuntu, apt).
#
# What it starts: its own cluster in STATE_DIR/data (not the distribution's `main` cluster), owned by the
# `postgres` user, listening on 127.0.0.1:${DDR_PG_PORT:-55432} only (no other address; its Unix socket in
# the root-only STATE_DIR/run), password (scram-sha-256) logins from 127.0.0.1 only. A role `ddr` with a
# generated password (STATE_DIR/password, mode 600) that may create databases, and a database `dagster`
# owned by it.
#
# Prints eval-able lines at the end: DDR_PG_HOST/PORT/USER/DB and DDR_PG_PASSWORD, which is read from the
# password file when the lines are eval'd (the password itself is never printed).
set -euo pipefail
trap 'echo "start_local_postgres.sh: line ${LINENO}: \`${BASH_COMMAND}\` failed (exit $?)" >&2' ERR

STATE_DIR="${1:-${DDR_PG_STATE_DIR:-/tmp/ddr-postgres}}"
PORT="${DDR_PG_PORT:-55432}"
ROLE="ddr"
DB="dagster"

if [[ "$(id -u)" -ne 0 ]]; then
  echo "start_local_postgres.sh must run as root (it installs packages and starts a server as \`postgres\`)" >&2
  exit 2
fi
[[ "${PORT}" =~ ^[0-9]{2,5}$ ]] || { echo "DDR_PG_PORT must be a port number, got '${PORT}'" >&2; exit 2; }

T0=$(date +%s.%N)
elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}'; }
log() { echo "[ddr-postgres +$(elapsed)s] $*" >&2; }

mkdir -p "${STATE_DIR}"
chmod 755 "${STATE_DIR}"   # postgres must traverse it to its data and run folders
LOGS="${STATE_DIR}/log"
mkdir -p "${LOGS}"

# ---------------------------------------------------------------- packages (another apt may hold the lock)
if ! dpkg-query -W -f='${Status}' postgresql 2>/dev/null | grep -q "install ok installed"; then
  log "installing postgresql"
  export DEBIAN_FRONTEND=noninteractive
  APT_OPTS=(-o DPkg::Lock::Timeout=300)   # wait for another apt-get / dpkg instead of failing
  apt-get "${APT_OPTS[@]}" update -qq
  apt-get "${APT_OPTS[@]}" install -y -qq --no-install-recommends postgresql >"${LOGS}/apt.log" 2>&1 \
    || { tail -n 30 "${LOGS}/apt.log" >&2; exit 1; }
fi
BIN="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
[[ -x "${BIN}/pg_ctl" ]] || { echo "no PostgreSQL server binaries under /usr/lib/postgresql/*/bin" >&2; exit 1; }
log "packages present (${BIN})"

# ---------------------------------------------------------------- cluster (created once)
DATA="${STATE_DIR}/data"
RUN="${STATE_DIR}/run"
mkdir -p "${RUN}"
chown postgres:postgres "${RUN}" "${LOGS}"
chmod 700 "${RUN}"   # the Unix socket: postgres (and root) only
PASSWORD_FILE="${STATE_DIR}/password"
if [[ ! -s "${PASSWORD_FILE}" ]]; then
  (umask 077; head -c 32 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' >"${PASSWORD_FILE}")
fi
chmod 600 "${PASSWORD_FILE}"
if [[ ! -s "${DATA}/PG_VERSION" ]]; then
  mkdir -p "${DATA}" && chown postgres:postgres "${DATA}" && chmod 700 "${DATA}"
  runuser -u postgres -- "${BIN}/initdb" -D "${DATA}" -U postgres --auth-local=peer --auth-host=scram-sha-256 \
    -E UTF8 --locale=C.UTF-8 >"${LOGS}/initdb.log" 2>&1 || { tail -n 20 "${LOGS}/initdb.log" >&2; exit 1; }
  log "cluster created in ${DATA}"
fi
# rewritten each time with the same content: loopback only, password logins from 127.0.0.1 only
cat >"${DATA}/postgresql.auto.conf" <<CONF
# Written by ddr scripts/start_local_postgres.sh
listen_addresses = '127.0.0.1'
port = ${PORT}
unix_socket_directories = '${RUN}'
password_encryption = 'scram-sha-256'
max_connections = 200
CONF
cat >"${DATA}/pg_hba.conf" <<CONF
# Written by ddr scripts/start_local_postgres.sh
local all postgres peer
host  all all 127.0.0.1/32 scram-sha-256
CONF
chown postgres:postgres "${DATA}/postgresql.auto.conf" "${DATA}/pg_hba.conf"

pg() { runuser -u postgres -- "${BIN}/$@"; }
if pg pg_ctl -D "${DATA}" status >/dev/null 2>&1; then
  pg pg_ctl -D "${DATA}" reload >/dev/null
else
  pg pg_ctl -D "${DATA}" -l "${LOGS}/postgresql.log" -w -t 60 start >/dev/null \
    || { tail -n 20 "${LOGS}/postgresql.log" >&2; exit 1; }
fi
pg pg_isready -h "${RUN}" -p "${PORT}" -t 30 >/dev/null
log "server up on 127.0.0.1:${PORT}"

# ---------------------------------------------------------------- role and database
psql_admin() { runuser -u postgres -- "${BIN}/psql" -h "${RUN}" -p "${PORT}" -v ON_ERROR_STOP=1 -qtA "$@"; }
PASSWORD="$(cat "${PASSWORD_FILE}")"
if [[ "$(psql_admin -c "SELECT 1 FROM pg_roles WHERE rolname = '${ROLE}'")" != "1" ]]; then
  psql_admin -c "CREATE ROLE ${ROLE} LOGIN CREATEDB"
fi
# the password goes through stdin, not the command line (other users see those in ps)
psql_admin <<SQL
ALTER ROLE ${ROLE} LOGIN CREATEDB PASSWORD '${PASSWORD}';
SQL
if [[ "$(psql_admin -c "SELECT 1 FROM pg_database WHERE datname = '${DB}'")" != "1" ]]; then
  psql_admin -c "CREATE DATABASE ${DB} OWNER ${ROLE}"
fi
log "role ${ROLE} and database ${DB} ready; PostgreSQL ready"

cat <<ENV
export DDR_PG_HOST=127.0.0.1
export DDR_PG_PORT=${PORT}
export DDR_PG_USER=${ROLE}
export DDR_PG_DB=${DB}
export DDR_PG_PASSWORD="\$(cat $(printf %q "${PASSWORD_FILE}"))"
ENV
