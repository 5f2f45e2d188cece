#!/usr/bin/env bash
# The container runtime for the image, the compose stack and the container test.
#
#   scripts/podman.sh install          podman (Debian's), runc, debootstrap, Prometheus
#                                      (Debian's, for promtool and the scrape test) and
#                                      podman-compose (PyPI, pinned, into .venv)
#   scripts/podman.sh check            install, then start a throw-away container
#   scripts/podman.sh podman ARGS...   podman with the project's containers.conf
#   scripts/podman.sh compose ARGS...  podman-compose with the same settings
#
# The project's containers.conf (infra/containers/containers.conf) is used through
# CONTAINERS_CONF, so /etc/containers is never edited; an already set CONTAINERS_CONF wins.
# Installing needs root (apt-get); everything else runs as whoever calls it.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${SCRIPT_DIR}/.." && pwd)"
VENV="${REPO_ROOT}/.venv"

PODMAN_COMPOSE_VERSION="1.6.0"
APT_PACKAGES=(podman runc debootstrap slirp4netns uidmap fuse-overlayfs prometheus netavark aardvark-dns)

export CONTAINERS_CONF="${CONTAINERS_CONF:-${REPO_ROOT}/infra/containers/containers.conf}"
# HEALTHCHECK is part of the docker image format only; OCI images would drop it.
export BUILDAH_FORMAT="${BUILDAH_FORMAT:-docker}"

log() { echo "[podman] $*"; }
err() { echo "[podman] ERROR: $*" >&2; }

missing_packages() {
  local pkg
  for pkg in "${APT_PACKAGES[@]}"; do
    if [[ "$(dpkg-query -W -f='${Status}' "${pkg}" 2>/dev/null)" != "install ok installed" ]]; then
      echo "${pkg}"
    fi
  done
}

install_apt() {
  local -a missing
  mapfile -t missing < <(missing_packages)
  if [[ ${#missing[@]} -eq 0 ]]; then
    return 0
  fi
  if [[ "$(id -u)" -ne 0 ]]; then
    err "missing Debian packages: ${missing[*]} (installing them needs root: apt-get install)"
    exit 1
  fi
  local t0=${SECONDS}
  log "installing ${missing[*]} with apt"
  apt-get update -q
  # No recommends: prometheus would bring the node exporter along and podman dbus and
  # systemd, none of which is used here. netavark and aardvark-dns (the network stack and
  # the DNS that lets compose services find each other by name) are recommends, so they
  # are named.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    "${APT_PACKAGES[@]}" iptables
  log "installed in $((SECONDS - t0)) s"
}

install_compose() {
  if [[ ! -x "${VENV}/bin/python" ]]; then
    err "no project virtualenv at .venv (run 'make install' first)"
    exit 1
  fi
  if [[ -x "${VENV}/bin/podman-compose" ]] \
    && [[ "$("${VENV}/bin/pip" show podman-compose 2>/dev/null | sed -n 's/^Version: //p')" \
      == "${PODMAN_COMPOSE_VERSION}" ]]; then
    return 0
  fi
  log "installing podman-compose ${PODMAN_COMPOSE_VERSION} into .venv"
  "${VENV}/bin/pip" install -q "podman-compose==${PODMAN_COMPOSE_VERSION}"
}

cmd_install() {
  install_apt
  install_compose
  log "podman $(podman --version | awk '{print $3}'), podman-compose ${PODMAN_COMPOSE_VERSION}," \
    "prometheus $(prometheus --version 2>&1 | awk 'NR==1 {print $3}'); CONTAINERS_CONF=${CONTAINERS_CONF}"
}

cmd_check() {
  cmd_install
  local base
  base="$(bash "${SCRIPT_DIR}/image.sh" base)"
  podman run --rm --network=none "${base}" true
  log "a container starts (${base})"
}

main() {
  local action="${1:-}"
  [[ $# -gt 0 ]] && shift
  case "${action}" in
    install) cmd_install ;;
    check) cmd_check ;;
    podman) exec podman "$@" ;;
    compose) exec "${VENV}/bin/podman-compose" "$@" ;;
    *)
      echo "usage: $0 install|check|podman ARGS...|compose ARGS..." >&2
      exit 2
      ;;
  esac
}

main "$@"
