#!/usr/bin/env bash
# Local MariaDB for development and tests (no systemd needed; run as root).
#
#   scripts/mariadb.sh start|stop|status|install
#
# install only installs mariadb-server with apt if it is missing (no server is
# started; scripts/secure.sh uses it for its TLS-only MariaDB).
#
# start installs mariadb-server with apt if needed, runs mariadbd on
# 127.0.0.1:3306 in the background (log in <repo>/.local/mariadb/mariadbd.log)
# and makes sure the application database and user exist:
#   COUPON_MYSQL_DB        (default: coupons)
#   COUPON_MYSQL_USER      (default: coupons)
#   COUPON_MYSQL_PASSWORD  (default: coupons)
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${SCRIPT_DIR}/.." && pwd)"

MARIADB_HOME="${REPO_ROOT}/.local/mariadb"
LOG_FILE="${MARIADB_HOME}/mariadbd.log"
PID_FILE="${MARIADB_HOME}/mariadbd.pid"

MARIADBD="/usr/sbin/mariadbd"
RUN_DIR="/run/mysqld"
DATA_DIR="/var/lib/mysql"
DB_HOST="127.0.0.1"
DB_PORT="3306"
START_TIMEOUT="${MARIADB_START_TIMEOUT:-60}"
STOP_TIMEOUT="${MARIADB_STOP_TIMEOUT:-60}"

DB_NAME="${COUPON_MYSQL_DB:-coupons}"
DB_USER="${COUPON_MYSQL_USER:-coupons}"
DB_PASSWORD="${COUPON_MYSQL_PASSWORD:-coupons}"

log() { echo "[mariadb] $*"; }
err() { echo "[mariadb] ERROR: $*" >&2; }

# As root over the unix socket (Debian's root@localhost uses unix_socket auth).
admin() { mariadb-admin --protocol=socket "$@"; }

is_up() { admin --connect-timeout=2 ping >/dev/null 2>&1; }

server_pid() {
  local pid f
  for f in "${PID_FILE}" "${RUN_DIR}/mysqld.pid"; do
    if [[ -f "${f}" ]]; then
      pid="$(cat "${f}" 2>/dev/null || true)"
      if [[ "${pid}" =~ ^[0-9]+$ ]] && kill -0 "${pid}" 2>/dev/null; then
        echo "${pid}"
        return 0
      fi
    fi
  done
  return 1
}

ensure_installed() {
  if [[ -x "${MARIADBD}" ]]; then
    return 0
  fi
  if [[ "$(id -u)" -ne 0 ]]; then
    err "${MARIADBD} is missing and installing it needs root (apt-get install mariadb-server)"
    exit 1
  fi
  local t0=${SECONDS}
  log "${MARIADBD} not found; installing mariadb-server with apt"
  log "+ apt-get update"
  apt-get update
  log "+ DEBIAN_FRONTEND=noninteractive apt-get install -y mariadb-server"
  DEBIAN_FRONTEND=noninteractive apt-get install -y mariadb-server
  if [[ ! -x "${MARIADBD}" ]]; then
    err "mariadb-server installed but ${MARIADBD} is still missing"
    exit 1
  fi
  log "installed mariadb-server in $((SECONDS - t0)) s"
}

ensure_datadir() {
  if [[ -d "${DATA_DIR}/mysql" ]]; then
    return 0
  fi
  log "initialising the system tables in ${DATA_DIR}"
  mariadb-install-db --user=mysql --datadir="${DATA_DIR}" >>"${LOG_FILE}" 2>&1
}

sql_quote() {
  # Single-quoted SQL string literal.
  printf "'%s'" "${1//\'/\'\'}"
}

ensure_db_and_user() {
  local name
  for name in "${DB_NAME}" "${DB_USER}"; do
    if [[ ! "${name}" =~ ^[A-Za-z0-9_]+$ ]]; then
      err "database and user names must match [A-Za-z0-9_]+ (got '${name}')"
      exit 1
    fi
  done
  local pw host sql
  pw="$(sql_quote "${DB_PASSWORD}")"
  sql="CREATE DATABASE IF NOT EXISTS \`${DB_NAME}\`;"
  for host in 127.0.0.1 localhost; do
    sql+="
CREATE USER IF NOT EXISTS '${DB_USER}'@'${host}' IDENTIFIED BY ${pw};
ALTER USER '${DB_USER}'@'${host}' IDENTIFIED BY ${pw};
GRANT ALL PRIVILEGES ON \`${DB_NAME}\`.* TO '${DB_USER}'@'${host}';"
  done
  sql+="
FLUSH PRIVILEGES;"
  if ! mariadb --protocol=socket -uroot <<<"${sql}"; then
    err "could not create database '${DB_NAME}' / user '${DB_USER}'"
    exit 1
  fi
  log "database '${DB_NAME}' and user '${DB_USER}'@127.0.0.1/localhost ready"
}

cmd_start() {
  if is_up; then
    log "already running on ${DB_HOST}:${DB_PORT}"
    ensure_db_and_user
    return 0
  fi
  ensure_installed
  mkdir -p "${MARIADB_HOME}"
  install -d -o mysql -g mysql -m 0755 "${RUN_DIR}"
  ensure_datadir

  local pid t0=${SECONDS}
  if pid="$(server_pid)"; then
    log "mariadbd (pid ${pid}) exists but does not answer yet; waiting for it..."
  else
    log "starting mariadbd (log in .local/mariadb/mariadbd.log)"
    echo "==== $(date '+%Y-%m-%d %H:%M:%S') starting mariadbd ====" >>"${LOG_FILE}"
    setsid nohup "${MARIADBD}" --user=mysql --bind-address="${DB_HOST}" --port="${DB_PORT}" \
      >>"${LOG_FILE}" 2>&1 </dev/null &
    pid=$!
    echo "${pid}" >"${PID_FILE}"
  fi

  local deadline=$((SECONDS + START_TIMEOUT))
  until is_up; do
    if ! kill -0 "${pid}" 2>/dev/null; then
      rm -f "${PID_FILE}"
      err "mariadbd exited during start-up; tail of .local/mariadb/mariadbd.log:"
      tail -n 30 "${LOG_FILE}" >&2 || true
      exit 1
    fi
    if ((SECONDS >= deadline)); then
      err "mariadbd did not answer 'mariadb-admin ping' within ${START_TIMEOUT} s (pid ${pid} left running)"
      tail -n 30 "${LOG_FILE}" >&2 || true
      exit 1
    fi
    sleep 1
  done
  log "ready on ${DB_HOST}:${DB_PORT} (pid ${pid}, took $((SECONDS - t0)) s)"
  ensure_db_and_user
}

cmd_stop() {
  if ! command -v mariadb-admin >/dev/null 2>&1; then
    log "not installed, nothing to stop"
    return 0
  fi
  local pid=""
  pid="$(server_pid || true)"
  if ! is_up; then
    if [[ -n "${pid}" ]]; then
      log "mariadbd (pid ${pid}) does not answer; sending SIGTERM"
      kill -TERM "${pid}" 2>/dev/null || true
    else
      log "not running"
      rm -f "${PID_FILE}"
      return 0
    fi
  else
    log "shutting down..."
    admin shutdown || true
  fi
  if [[ -n "${pid}" ]]; then
    local deadline=$((SECONDS + STOP_TIMEOUT))
    while kill -0 "${pid}" 2>/dev/null && ((SECONDS < deadline)); do
      sleep 0.5
    done
    if kill -0 "${pid}" 2>/dev/null; then
      log "still running after ${STOP_TIMEOUT} s; sending SIGKILL"
      kill -KILL "${pid}" 2>/dev/null || true
    fi
  fi
  rm -f "${PID_FILE}"
  log "stopped"
}

cmd_status() {
  if command -v mariadb-admin >/dev/null 2>&1 && is_up; then
    log "running on ${DB_HOST}:${DB_PORT}"
    return 0
  fi
  log "not running"
  return 1
}

usage() {
  echo "usage: $0 start|stop|status|install" >&2
}

main() {
  if [[ $# -ne 1 ]]; then
    usage
    exit 2
  fi
  case "$1" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    install) ensure_installed ;;
    restart)
      cmd_stop
      cmd_start
      ;;
    -h | --help | help) usage ;;
    *)
      usage
      exit 2
      ;;
  esac
}

main "$@"
