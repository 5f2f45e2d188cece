#!/usr/bin/env bash
# Start/stop all local services used by coupon-stream (Kafka + MariaDB).
#
#   scripts/services.sh up|down|status [kafka|mariadb ...]
#
# Without a service name all services are affected, e.g.
#   scripts/services.sh up          # Kafka and MariaDB
#   scripts/services.sh up kafka    # only Kafka
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ALL_SERVICES=(kafka mariadb)

log() { echo "[services] $*"; }

usage() {
  echo "usage: $0 up|down|status [kafka|mariadb ...]" >&2
}

main() {
  if [[ $# -lt 1 ]]; then
    usage
    exit 2
  fi
  local action="$1"
  shift
  local -a services
  if [[ $# -gt 0 ]]; then
    services=("$@")
  else
    services=("${ALL_SERVICES[@]}")
  fi
  local svc
  for svc in "${services[@]}"; do
    case "${svc}" in
      kafka | mariadb) ;;
      *)
        echo "[services] unknown service '${svc}' (known: ${ALL_SERVICES[*]})" >&2
        exit 2
        ;;
    esac
  done

  local rc=0
  case "${action}" in
    up)
      for svc in "${services[@]}"; do
        bash "${SCRIPT_DIR}/${svc}.sh" start
      done
      log "up: ${services[*]}"
      ;;
    down)
      # Stop in reverse order; try every service even if one fails.
      local i
      for ((i = ${#services[@]} - 1; i >= 0; i--)); do
        bash "${SCRIPT_DIR}/${services[i]}.sh" stop || rc=1
      done
      ;;
    status)
      for svc in "${services[@]}"; do
        bash "${SCRIPT_DIR}/${svc}.sh" status || rc=1
      done
      ;;
    -h | --help | help) usage ;;
    *)
      usage
      exit 2
      ;;
  esac
  return "${rc}"
}

main "$@"
