#!/usr/bin/env bash
# Toxiproxy (Shopify's TCP proxy that injects network faults) for the integration tests'
# network-fault tests: a worker talks to Kafka through it, a test cuts or slows the link.
#
#   scripts/toxiproxy.sh install|start|stop|status
#
# install  builds toxiproxy's server with `go install` (Go only, no other tools) into
#          .local/bin/toxiproxy-server; skipped when that binary is already this version.
#          GOPATH and GOCACHE are the usual ones, or under .local/go when $HOME is unusable.
# start    installs if needed, runs the server in the background (log .local/toxiproxy.log,
#          pid .local/toxiproxy.pid), waits until its API answers and creates the proxy
#          "kafka" if it is missing. Does nothing when it is already running.
# stop     stops the server started here (its proxies close with it).
# status   whether the API answers, and its proxies.
#
# Addresses (127.0.0.1 only):
#   127.0.0.1:8474  the HTTP API (tests/integration/toxiproxy.py)
#   127.0.0.1:9095  proxy "kafka" -> 127.0.0.1:9094, the broker's PROXIED listener
#                   (infra/kafka/server.properties), which advertises 127.0.0.1:9095: a client
#                   bootstrapping at 9095 reaches the broker only through the proxy.
#   127.0.0.1:3316  proxy "mysql" -> 127.0.0.1:3306, MariaDB (made by the tests that use it,
#                   tests/integration/toxiproxy.py).
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${SCRIPT_DIR}/.." && pwd)"

TOXIPROXY_VERSION="v2.5.0"
TOXIPROXY_MODULE="github.com/Shopify/toxiproxy/v2"

LOCAL_DIR="${REPO_ROOT}/.local"
BIN_DIR="${LOCAL_DIR}/bin"
BINARY="${BIN_DIR}/toxiproxy-server"
LOG_FILE="${LOCAL_DIR}/toxiproxy.log"
PID_FILE="${LOCAL_DIR}/toxiproxy.pid"

HOST="127.0.0.1"
API_PORT="8474"
API="http://${HOST}:${API_PORT}"
KAFKA_PROXY_NAME="kafka"
KAFKA_PROXY_LISTEN="${HOST}:9095"
KAFKA_PROXY_UPSTREAM="${HOST}:9094"
START_TIMEOUT="${TOXIPROXY_START_TIMEOUT:-20}"
# debug (its default) logs every API call; TOXIPROXY_LOG_LEVEL=debug for that.
LOG_LEVEL="${TOXIPROXY_LOG_LEVEL:-info}"
STOP_TIMEOUT="${TOXIPROXY_STOP_TIMEOUT:-10}"

log() { echo "[toxiproxy] $*"; }
err() { echo "[toxiproxy] ERROR: $*" >&2; }

port_open() {
  timeout 2 bash -c "exec 3<>/dev/tcp/${HOST}/$1" 2>/dev/null
}

# GET/POST on the API with curl; prints the body, fails on a transport error or HTTP >= 400.
api() {
  local method="$1" path="$2" body="${3:-}"
  local -a args=(-fsS --max-time 5 -X "${method}")
  if [[ -n "${body}" ]]; then
    args+=(-H 'Content-Type: application/json' --data "${body}")
  fi
  curl "${args[@]}" "${API}${path}"
}

api_up() {
  api GET /version >/dev/null 2>&1
}

# Prints the pid of the server started here if it is alive, else returns 1.
running_pid() {
  local pid
  [[ -f "${PID_FILE}" ]] || return 1
  pid="$(cat "${PID_FILE}" 2>/dev/null || true)"
  if [[ "${pid}" =~ ^[0-9]+$ ]] && kill -0 "${pid}" 2>/dev/null; then
    echo "${pid}"
    return 0
  fi
  return 1
}

find_go() {
  if command -v go >/dev/null 2>&1; then
    command -v go
  elif [[ -x /usr/local/go/bin/go ]]; then
    echo /usr/local/go/bin/go
  else
    return 1
  fi
}

# The module version the binary was built from (`go version -m`), or nothing.
built_version() {
  local go="$1"
  [[ -x "${BINARY}" ]] || return 0
  "${go}" version -m "${BINARY}" 2>/dev/null \
    | awk -v m="${TOXIPROXY_MODULE}" '$1 == "mod" && $2 == m { print $3 }'
}

cmd_install() {
  local go
  if ! go="$(find_go)"; then
    if [[ -x "${BINARY}" ]]; then
      log "no Go toolchain to check it, using the existing .local/bin/toxiproxy-server"
      return 0
    fi
    err "'go' not found on PATH (install Go 1.19 or newer: https://go.dev/dl/)"
    return 1
  fi
  if [[ "$(built_version "${go}")" == "${TOXIPROXY_VERSION}" ]]; then
    return 0
  fi
  # Go keeps its module and build caches under $HOME; when that is missing or read-only,
  # they go under .local/go (the user's own settings, if any, win).
  if [[ -z "${HOME:-}" || ! -d "${HOME}" || ! -w "${HOME}" ]]; then
    export GOPATH="${GOPATH:-${LOCAL_DIR}/go}"
    export GOCACHE="${GOCACHE:-${LOCAL_DIR}/go/cache}"
    # A writable module cache, so that `rm -rf .local` can remove it.
    export GOFLAGS="${GOFLAGS:+${GOFLAGS} }-modcacherw"
    log "\$HOME is unusable; Go caches under .local/go"
  fi
  mkdir -p "${BIN_DIR}"
  local gobin="${LOCAL_DIR}/toxiproxy-gobin.tmp"
  rm -rf "${gobin}"
  mkdir -p "${gobin}"
  log "building ${TOXIPROXY_MODULE}/cmd/server@${TOXIPROXY_VERSION} with $("${go}" version | awk '{print $3}') (download and compile: about 20 s on 2 cores)..."
  local t0=${SECONDS}
  # GOTOOLCHAIN=local: build with this Go, never download another toolchain. nice: the
  # compile shares the machine with tests. -X: the version its API reports (else "git").
  if ! GOBIN="${gobin}" GOTOOLCHAIN=local CGO_ENABLED=0 nice -n 10 \
    "${go}" install -ldflags "-X ${TOXIPROXY_MODULE}.Version=${TOXIPROXY_VERSION#v}" \
    "${TOXIPROXY_MODULE}/cmd/server@${TOXIPROXY_VERSION}"; then
    rm -rf "${gobin}"
    err "go install failed (output above)"
    return 1
  fi
  # `go install` names the binary after its package directory ("server").
  mv -f "${gobin}/server" "${BINARY}"
  rm -rf "${gobin}"
  log "installed .local/bin/toxiproxy-server ${TOXIPROXY_VERSION} in $((SECONDS - t0)) s"
}

# Creates the proxy "kafka" unless it exists (a test resets it to its own liking).
ensure_kafka_proxy() {
  if api GET "/proxies/${KAFKA_PROXY_NAME}" >/dev/null 2>&1; then
    return 0
  fi
  api POST /proxies "{\"name\":\"${KAFKA_PROXY_NAME}\",\"listen\":\"${KAFKA_PROXY_LISTEN}\",\"upstream\":\"${KAFKA_PROXY_UPSTREAM}\",\"enabled\":true}" >/dev/null
  log "proxy ${KAFKA_PROXY_NAME}: ${KAFKA_PROXY_LISTEN} -> ${KAFKA_PROXY_UPSTREAM}"
}

cmd_start() {
  local pid
  if pid="$(running_pid)" && api_up; then
    ensure_kafka_proxy
    log "already running (pid ${pid}), API on ${API}"
    return 0
  fi
  if [[ -z "${pid:-}" ]] && api_up; then
    ensure_kafka_proxy
    log "a toxiproxy not started by this script answers on ${API}; using it"
    return 0
  fi
  if [[ -z "${pid:-}" ]] && port_open "${API_PORT}"; then
    err "${HOST}:${API_PORT} is taken by something that is not toxiproxy's API"
    return 1
  fi
  cmd_install
  mkdir -p "${LOCAL_DIR}"
  if [[ -z "${pid:-}" ]]; then
    log "starting .local/bin/toxiproxy-server (log .local/toxiproxy.log)"
    echo "==== $(date '+%Y-%m-%d %H:%M:%S') starting toxiproxy-server ====" >>"${LOG_FILE}"
    LOG_LEVEL="${LOG_LEVEL}" setsid nohup "${BINARY}" -host "${HOST}" -port "${API_PORT}" \
      >>"${LOG_FILE}" 2>&1 </dev/null &
    pid=$!
    echo "${pid}" >"${PID_FILE}"
  else
    log "process ${pid} exists but its API is not answering yet; waiting for it..."
  fi
  local deadline=$((SECONDS + START_TIMEOUT))
  until api_up; do
    if ! kill -0 "${pid}" 2>/dev/null; then
      rm -f "${PID_FILE}"
      err "toxiproxy-server (pid ${pid}) exited during start-up; tail of .local/toxiproxy.log:"
      tail -n 20 "${LOG_FILE}" >&2 || true
      return 1
    fi
    if ((SECONDS >= deadline)); then
      err "API not answering on ${API} after ${START_TIMEOUT} s (pid ${pid} left running)"
      tail -n 20 "${LOG_FILE}" >&2 || true
      return 1
    fi
    sleep 0.2
  done
  ensure_kafka_proxy
  log "ready (pid ${pid}), API on ${API}"
}

cmd_stop() {
  local pid
  if ! pid="$(running_pid)"; then
    rm -f "${PID_FILE}"
    if api_up; then
      log "not started by this script, but a toxiproxy answers on ${API}; leaving it alone"
    else
      log "not running"
    fi
    return 0
  fi
  log "stopping (pid ${pid}, SIGTERM)..."
  kill -TERM "${pid}" 2>/dev/null || true
  local deadline=$((SECONDS + STOP_TIMEOUT))
  while kill -0 "${pid}" 2>/dev/null && ((SECONDS < deadline)); do
    sleep 0.2
  done
  if kill -0 "${pid}" 2>/dev/null; then
    log "still running after ${STOP_TIMEOUT} s; sending SIGKILL"
    kill -KILL "${pid}" 2>/dev/null || true
  fi
  rm -f "${PID_FILE}"
  log "stopped"
}

cmd_status() {
  local pid version proxies
  if ! api_up; then
    if pid="$(running_pid)"; then
      log "process ${pid} exists but ${API} is not answering"
    else
      log "not running"
    fi
    return 1
  fi
  version="$(api GET /version 2>/dev/null | tr -d '\n')"
  if pid="$(running_pid)"; then
    log "running (pid ${pid}, version ${version}), API on ${API}"
  else
    log "answering on ${API} (version ${version}; not started by this script)"
  fi
  proxies="$(api GET /proxies 2>/dev/null || true)"
  if command -v python3 >/dev/null 2>&1; then
    printf '%s' "${proxies}" | python3 -c '
import json, sys
for p in json.load(sys.stdin).values():
    state = "enabled" if p["enabled"] else "DISABLED"
    toxics = ", ".join(t["name"] for t in p.get("toxics") or []) or "none"
    name, listen, upstream = p["name"], p["listen"], p["upstream"]
    print(f"[toxiproxy]   {name}: {listen} -> {upstream} {state}, toxics: {toxics}")
' || true
  else
    log "  proxies: ${proxies}"
  fi
}

usage() {
  echo "usage: $0 install|start|stop|status" >&2
}

main() {
  if [[ $# -ne 1 ]]; then
    usage
    exit 2
  fi
  case "$1" in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    -h | --help | help) usage ;;
    *)
      usage
      exit 2
      ;;
  esac
}

main "$@"
