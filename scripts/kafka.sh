#!/usr/bin/env bash
# Local single-node Apache Kafka (KRaft) for development and tests.
#
#   scripts/kafka.sh start|stop|status|restart|libs
#
# libs only fetches the broker jars into .local/kafka/libs if they are missing
# (scripts/secure.sh uses it for its secured broker).
#
# Everything lives under <repo>/.local/kafka:
#   libs/               broker jars, fetched from Maven Central via infra/kafka/pom.xml
#   data/               KRaft metadata + topic data (formatted on first start)
#   logs/               server.log etc. (log4j) and server.out (JVM stdout/stderr)
#   server.properties   generated from infra/kafka/server.properties
#   kafka.pid           pid of the running broker
#
# Listeners (infra/kafka/server.properties):
#   127.0.0.1:9092  PLAINTEXT, for clients
#   127.0.0.1:9093  the KRaft controller
#   127.0.0.1:9094  PROXIED, advertised as 127.0.0.1:9095: toxiproxy's proxy to this
#                   listener (scripts/toxiproxy.sh), for the network-fault tests
#
# start on a broker that runs with other settings than infra/kafka/server.properties
# (comments aside) restarts it with the repo's; the data in .local/kafka/data is kept.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${SCRIPT_DIR}/.." && pwd)"
# shellcheck source=scripts/kafka-started.sh
source "${SCRIPT_DIR}/kafka-started.sh"

INFRA_DIR="${REPO_ROOT}/infra/kafka"
KAFKA_HOME="${REPO_ROOT}/.local/kafka"
LIBS_DIR="${KAFKA_HOME}/libs"
DATA_DIR="${KAFKA_HOME}/data"
LOG_DIR="${KAFKA_HOME}/logs"
PROPS_FILE="${KAFKA_HOME}/server.properties"
PID_FILE="${KAFKA_HOME}/kafka.pid"
OUT_FILE="${LOG_DIR}/server.out"
SERVER_LOG="${LOG_DIR}/server.log"

KAFKA_HOST="127.0.0.1"
KAFKA_PORT="9092"
KAFKA_PROXIED_PORT="9094" # the PROXIED listener, behind toxiproxy's 127.0.0.1:9095
START_TIMEOUT="${KAFKA_START_TIMEOUT:-90}"
STOP_TIMEOUT="${KAFKA_STOP_TIMEOUT:-30}"
KAFKA_HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xmx1g -Xms256m}"

log() { echo "[kafka] $*"; }
err() { echo "[kafka] ERROR: $*" >&2; }

kafka_version() {
  sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "${INFRA_DIR}/pom.xml" | head -n 1
}

port_open() {
  timeout 2 bash -c "exec 3<>/dev/tcp/${KAFKA_HOST}/${1:-${KAFKA_PORT}}" 2>/dev/null
}

# Prints the pid of our broker if it is running, else nothing (and returns 1).
running_pid() {
  local pid
  if [[ -f "${PID_FILE}" ]]; then
    pid="$(cat "${PID_FILE}" 2>/dev/null || true)"
    if [[ "${pid}" =~ ^[0-9]+$ ]] && kill -0 "${pid}" 2>/dev/null; then
      echo "${pid}"
      return 0
    fi
  fi
  # Fallback: a broker of this checkout started without (or lost) its pid file.
  pid="$(pgrep -f -- "kafka\\.Kafka ${PROPS_FILE}" | head -n 1 || true)"
  if [[ -n "${pid}" ]]; then
    echo "${pid}"
    return 0
  fi
  return 1
}

require_cmd() {
  if ! command -v "$1" >/dev/null 2>&1; then
    err "'$1' not found on PATH ($2)"
    exit 1
  fi
}

ensure_libs() {
  local version
  version="$(kafka_version)"
  if [[ -z "${version}" ]]; then
    err "cannot read <kafka.version> from infra/kafka/pom.xml"
    exit 1
  fi
  if [[ -f "${LIBS_DIR}/kafka_2.13-${version}.jar" ]] \
    && compgen -G "${LIBS_DIR}/slf4j-reload4j-*.jar" >/dev/null; then
    return 0
  fi
  require_cmd mvn "install Maven, e.g. apt-get install -y maven"
  log "broker jars for Kafka ${version} missing; fetching them with Maven (first time takes a while)..."
  local tmp="${KAFKA_HOME}/libs.tmp"
  rm -rf "${tmp}"
  mkdir -p "${KAFKA_HOME}"
  local t0=${SECONDS}
  local out rc=0
  # Maven 3.8 prints stray colour codes even with -q -B; strip them.
  out="$(mvn -q -B -Dstyle.color=never -f "${INFRA_DIR}/pom.xml" \
    dependency:copy-dependencies -DoutputDirectory="${tmp}" 2>&1)" || rc=$?
  out="$(printf '%s' "${out}" | sed 's/\x1b\[[0-9;]*m//g')"
  if [[ -n "${out//[[:space:]]/}" ]]; then
    printf '%s\n' "${out}"
  fi
  if [[ "${rc}" -ne 0 ]]; then
    rm -rf "${tmp}"
    err "maven could not fetch the Kafka jars (exit ${rc}, see output above)"
    exit 1
  fi
  rm -rf "${LIBS_DIR}"
  mv "${tmp}" "${LIBS_DIR}"
  log "fetched $(find "${LIBS_DIR}" -name '*.jar' | wc -l) jars into .local/kafka/libs in $((SECONDS - t0)) s"
}

# The broker's properties: the repo's, with log.dirs made absolute.
render_props() {
  sed "s|^log\\.dirs=.*|log.dirs=${DATA_DIR}|" "${INFRA_DIR}/server.properties"
}

write_props() {
  mkdir -p "${DATA_DIR}" "${LOG_DIR}"
  render_props >"${PROPS_FILE}.tmp"
  mv "${PROPS_FILE}.tmp" "${PROPS_FILE}"
}

# Settings only: no comments or blank lines, sorted.
settings_of() {
  { grep -v -E '^[[:space:]]*([#!]|$)' || true; } | sort
}

# Whether the running broker's properties (.local/kafka/server.properties, written when it
# was started) set what infra/kafka/server.properties sets now.
props_current() {
  [[ -f "${PROPS_FILE}" ]] || return 1
  cmp -s <(render_props | settings_of) <(settings_of <"${PROPS_FILE}")
}

# The settings that differ (running broker vs. repo), one per line, for the log.
props_diff() {
  diff <(settings_of <"${PROPS_FILE}" 2>/dev/null) <(render_props | settings_of) \
    | grep -E '^[<>]' | sed 's/^</    running:/; s/^>/    repo:   /' || true
}

java_base() {
  # Used for both the storage tool and the broker.
  printf '%s\n' \
    -cp "${LIBS_DIR}/*" \
    -Dlog4j.configuration="file:${INFRA_DIR}/log4j.properties" \
    -Dkafka.logs.dir="${LOG_DIR}"
}

format_storage() {
  if [[ -f "${DATA_DIR}/meta.properties" ]]; then
    return 0
  fi
  local -a base
  mapfile -t base < <(java_base)
  local cluster_id
  cluster_id="$(java "${base[@]}" kafka.tools.StorageTool random-uuid 2>>"${OUT_FILE}" | tail -n 1)"
  if [[ -z "${cluster_id}" ]]; then
    err "could not generate a cluster id (see .local/kafka/logs/server.out)"
    exit 1
  fi
  log "formatting storage in .local/kafka/data (cluster id ${cluster_id})"
  if ! java "${base[@]}" kafka.tools.StorageTool format \
    --config "${PROPS_FILE}" --cluster-id "${cluster_id}" >>"${OUT_FILE}" 2>&1; then
    err "storage format failed; tail of .local/kafka/logs/server.out:"
    tail -n 30 "${OUT_FILE}" >&2 || true
    exit 1
  fi
}

show_log_tail() {
  echo "---- tail of .local/kafka/logs/server.log ----" >&2
  tail -n 40 "${SERVER_LOG}" >&2 2>/dev/null || true
  echo "---- tail of .local/kafka/logs/server.out ----" >&2
  tail -n 20 "${OUT_FILE}" >&2 2>/dev/null || true
}

wait_ready() {
  local pid="$1" since="$2"
  local deadline=$((SECONDS + START_TIMEOUT))
  while ((SECONDS < deadline)); do
    if ! kill -0 "${pid}" 2>/dev/null; then
      rm -f "${PID_FILE}"
      err "broker process ${pid} exited during start-up"
      show_log_tail
      return 1
    fi
    if port_open && port_open "${KAFKA_PROXIED_PORT}" && kafka_started_since "${SERVER_LOG}" "${since}"; then
      return 0
    fi
    sleep 1
  done
  err "broker not ready on ${KAFKA_HOST}:${KAFKA_PORT} after ${START_TIMEOUT} s (pid ${pid} left running)"
  show_log_tail
  return 1
}

cmd_start() {
  local pid
  if pid="$(running_pid)" && ! props_current; then
    log "broker (pid ${pid}) runs with other settings than infra/kafka/server.properties:"
    props_diff
    log "restarting it with the repo's (data in .local/kafka/data is kept)"
    cmd_stop
  fi
  if pid="$(running_pid)"; then
    if port_open; then
      log "already running (pid ${pid}) on ${KAFKA_HOST}:${KAFKA_PORT}"
      return 0
    fi
    log "broker process ${pid} exists but is not answering yet; waiting for it..."
    if wait_ready "${pid}" ""; then
      log "ready on ${KAFKA_HOST}:${KAFKA_PORT} (pid ${pid})"
      return 0
    fi
    return 1
  fi
  if port_open; then
    log "something is already answering on ${KAFKA_HOST}:${KAFKA_PORT} (not started by this script); using it"
    if ! port_open "${KAFKA_PROXIED_PORT}"; then
      log "WARNING: it has no PROXIED listener on ${KAFKA_HOST}:${KAFKA_PROXIED_PORT}; tests through toxiproxy cannot reach it"
    fi
    return 0
  fi

  require_cmd java "install a JDK 17, e.g. apt-get install -y openjdk-17-jre-headless"
  mkdir -p "${KAFKA_HOME}" "${LOG_DIR}" "${DATA_DIR}"
  ensure_libs
  write_props
  format_storage

  local -a base heap
  mapfile -t base < <(java_base)
  read -r -a heap <<<"${KAFKA_HEAP_OPTS}"
  local started
  started="$(kafka_log_stamp)"
  log "starting broker (logs in .local/kafka/logs/)"
  local t0=${SECONDS}
  (
    cd "${KAFKA_HOME}"
    echo "==== $(date '+%Y-%m-%d %H:%M:%S') starting kafka.Kafka ====" >>"${OUT_FILE}"
    exec setsid nohup java "${heap[@]}" \
      -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 \
      -XX:+ExplicitGCInvokesConcurrent -Djava.awt.headless=true \
      "${base[@]}" \
      kafka.Kafka "${PROPS_FILE}" >>"${OUT_FILE}" 2>&1 </dev/null
  ) &
  pid=$!
  echo "${pid}" >"${PID_FILE}"
  if wait_ready "${pid}" "${started}"; then
    log "ready on ${KAFKA_HOST}:${KAFKA_PORT} (pid ${pid}, took $((SECONDS - t0)) s)"
    return 0
  fi
  return 1
}

cmd_stop() {
  local pid
  if ! pid="$(running_pid)"; then
    rm -f "${PID_FILE}"
    if port_open; then
      log "not started by this script, but something answers on ${KAFKA_HOST}:${KAFKA_PORT}; leaving it alone"
    else
      log "not running"
    fi
    return 0
  fi
  log "stopping broker (pid ${pid}, SIGTERM)..."
  kill -TERM "${pid}" 2>/dev/null || true
  local deadline=$((SECONDS + STOP_TIMEOUT))
  while kill -0 "${pid}" 2>/dev/null && ((SECONDS < deadline)); do
    sleep 1
  done
  if kill -0 "${pid}" 2>/dev/null; then
    log "still running after ${STOP_TIMEOUT} s; sending SIGKILL"
    kill -KILL "${pid}" 2>/dev/null || true
    while kill -0 "${pid}" 2>/dev/null; do
      sleep 0.2
    done
  fi
  rm -f "${PID_FILE}"
  # Give the kernel a moment to release the listening ports.
  local deadline2=$((SECONDS + 5))
  while port_open && ((SECONDS < deadline2)); do
    sleep 0.5
  done
  log "stopped"
}

cmd_status() {
  local pid
  if port_open; then
    if pid="$(running_pid)"; then
      log "running (pid ${pid}) on ${KAFKA_HOST}:${KAFKA_PORT}"
      if ! props_current; then
        log "WARNING: with other settings than infra/kafka/server.properties (\`bash scripts/kafka.sh start\` restarts it with the repo's):"
        props_diff
      fi
    else
      log "answering on ${KAFKA_HOST}:${KAFKA_PORT} (not started by this script)"
    fi
    if ! port_open "${KAFKA_PROXIED_PORT}"; then
      log "WARNING: no PROXIED listener on ${KAFKA_HOST}:${KAFKA_PROXIED_PORT} (toxiproxy's upstream)"
    fi
    return 0
  fi
  if pid="$(running_pid)"; then
    log "process ${pid} exists but ${KAFKA_HOST}:${KAFKA_PORT} is not answering"
  else
    log "not running"
  fi
  return 1
}

usage() {
  echo "usage: $0 start|stop|status|restart|libs" >&2
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
    libs) ensure_libs ;;
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
