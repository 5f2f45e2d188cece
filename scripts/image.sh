#!/usr/bin/env bash
# Builds the worker image, and whatever it and the compose stack need that no registry gives.
#
#   scripts/image.sh [all]      the images of the compose stack (default; `make image`)
#   scripts/image.sh worker     the worker image alone (its base image first, if missing)
#   scripts/image.sh base       prints the name of the Debian base image, building it if missing
#   scripts/image.sh list       every image the compose stack uses, and where each comes from
#
# Images are podman's (scripts/podman.sh installs it). Each third-party image of the
# Dockerfile and docker-compose.yml is used from local storage when it is there, else pulled
# from its registry, else (registry unreachable: air-gapped sites, and these machines)
# replaced by a local stand-in built from Debian's packages and tagged with the same name,
# so the same Dockerfile and compose file work both ways:
#
#   docker.io/library/debian:bookworm-slim  debootstrap --variant=minbase, then podman import
#   docker.io/library/python:3.11-slim      Debian's python3 (3.11), venv, pip
#   docker.io/apache/kafka:<pom version>    Debian's OpenJDK 17 + the Kafka jars from Maven
#                                           Central (infra/containers/kafka/pom.xml), with the
#                                           official image's env handling and bin/ scripts
#   docker.io/library/mysql:8.4             Debian's MariaDB 10.11, honouring MYSQL_*
#   docker.io/prom/prometheus:<tag>         Debian's prometheus package
#
# Grafana is not in Debian's archive: it comes from its registry or not at all (the compose
# test leaves it out; its dashboard is still tested against a real Prometheus).
# Stand-ins carry the label coupon-stream.standin=<hash of their inputs>; one whose inputs
# changed is rebuilt, a real image (no such label) is never replaced.
#
# Settings (environment):
#   COUPON_IMAGE          worker image name (default localhost/coupon-stream:local)
#   COUPON_IMAGE_SOURCE   auto (default) | registry (pull, never build stand-ins)
#                         | local (never pull, build stand-ins)
#   COUPON_EXTRA_CA_DIR   a directory of extra CA certificates (*.crt, PEM) for HTTPS inside
#                         the worker image's build (pip), for TLS-inspecting proxies. Off by
#                         default. They are passed as a build secret: used by the pip step
#                         only, never stored in a layer of the image.
#   COUPON_DEBIAN_MIRROR  Debian mirror for debootstrap and the stand-ins (default: the
#                         first http(s) mirror in /etc/apt/sources.list.d, else
#                         http://deb.debian.org/debian)
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${SCRIPT_DIR}/.." && pwd)"
INFRA="${REPO_ROOT}/infra/containers"
WORK="${REPO_ROOT}/.local/containers"

export CONTAINERS_CONF="${CONTAINERS_CONF:-${INFRA}/containers.conf}"
export BUILDAH_FORMAT="${BUILDAH_FORMAT:-docker}"

KAFKA_VERSION="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "${REPO_ROOT}/infra/kafka/pom.xml" | head -n 1)"
SUITE="bookworm"
BASE_IMAGE="docker.io/library/debian:${SUITE}-slim"
PYTHON_IMAGE="docker.io/library/python:3.11-slim"
KAFKA_IMAGE="docker.io/apache/kafka:${KAFKA_VERSION}"
MYSQL_IMAGE="docker.io/library/mysql:8.4"
PROMETHEUS_IMAGE="docker.io/prom/prometheus:v3.5.0"
WORKER_IMAGE="${COUPON_IMAGE:-localhost/coupon-stream:local}"
SOURCE="${COUPON_IMAGE_SOURCE:-auto}"
PULL_TIMEOUT="${COUPON_PULL_TIMEOUT:-300}"

log() { echo "[image] $*" >&2; }
err() { echo "[image] ERROR: $*" >&2; }

require_podman() {
  if ! command -v podman >/dev/null 2>&1; then
    err "podman not found (scripts/podman.sh install)"
    exit 1
  fi
}

debian_mirror() {
  if [[ -n "${COUPON_DEBIAN_MIRROR:-}" ]]; then
    echo "${COUPON_DEBIAN_MIRROR}"
    return
  fi
  local uri
  # "URIs:" of deb822 .sources files, or the URI of a one-line "deb" entry.
  uri="$(cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
    | sed -nE 's/^(URIs:|deb( \[[^]]*\])?)[[:space:]]+(https?:[^[:space:]]+).*/\3/p' \
    | grep -v security | head -n 1 || true)"
  echo "${uri:-http://deb.debian.org/debian}"
}

# Hash of a stand-in's inputs: its build files plus anything else given.
inputs_hash() {
  { for f in "$@"; do
      if [[ -d "${f}" ]]; then find "${f}" -type f -print0 | sort -z | xargs -0 cat; else echo "${f}"; fi
    done; } | sha256sum | cut -c1-16
}

label_of() {
  podman image inspect --format '{{index .Labels "coupon-stream.standin"}}' "$1" 2>/dev/null || true
}

# ensure IMAGE HASH BUILDER: use IMAGE if present (and, if a stand-in, current), else pull
# it, else run BUILDER to make a stand-in.
ensure() {
  local image="$1" hash="$2" builder="$3" t0=${SECONDS}
  if podman image exists "${image}"; then
    local have
    have="$(label_of "${image}")"
    if [[ -z "${have}" || "${have}" == "<no value>" ]]; then
      log "${image}: in local storage"
      return 0
    fi
    if [[ "${have}" == "${hash}" ]]; then
      log "${image}: local stand-in, current"
      return 0
    fi
    log "${image}: local stand-in built from older inputs; rebuilding"
  elif [[ "${SOURCE}" != "local" ]]; then
    log "${image}: pulling"
    if timeout "${PULL_TIMEOUT}" podman pull -q "${image}" >/dev/null 2>"${WORK}/pull.err"; then
      log "${image}: pulled in $((SECONDS - t0)) s"
      return 0
    fi
    if [[ "${SOURCE}" == "registry" ]]; then
      err "cannot pull ${image}: $(tail -n 1 "${WORK}/pull.err")"
      exit 1
    fi
    log "${image}: registry unreachable ($(tail -n 1 "${WORK}/pull.err" | cut -c1-120)); building a local stand-in"
  fi
  "${builder}" "${image}" "${hash}"
  log "${image}: stand-in built in $((SECONDS - t0)) s"
}

# -- stand-ins --------------------------------------------------------------------------------

base_hash() { inputs_hash "${INFRA}/debian" "${SUITE}" "$(debian_mirror)"; }

build_base() {
  local image="$1" hash="$2"
  if ! command -v debootstrap >/dev/null 2>&1; then
    err "debootstrap not found (scripts/podman.sh install)"
    exit 1
  fi
  local mirror rootfs
  mirror="$(debian_mirror)"
  rootfs="${WORK}/rootfs-${SUITE}"
  rm -rf "${rootfs}"
  mkdir -p "${rootfs}"
  log "debootstrap --variant=minbase ${SUITE} from ${mirror} (about a minute)"
  debootstrap --variant=minbase "${SUITE}" "${rootfs}" "${mirror}" >"${WORK}/debootstrap.log" 2>&1 || {
    tail -n 20 "${WORK}/debootstrap.log" >&2
    err "debootstrap failed (log: .local/containers/debootstrap.log)"
    exit 1
  }
  # What Debian's official image does too: no services started by package installs, no
  # docs, apt sources for the suite, its updates and its security archive.
  cp -a "${INFRA}/debian/rootfs/." "${rootfs}/"
  chmod 0755 "${rootfs}/usr/sbin/policy-rc.d"
  rm -f "${rootfs}/etc/apt/sources.list"
  sed -e "s|@MIRROR@|${mirror%/}|g" -e "s|@SUITE@|${SUITE}|g" \
    "${INFRA}/debian/debian.sources.in" >"${rootfs}/etc/apt/sources.list.d/debian.sources"
  rm -rf "${rootfs}"/var/cache/apt/archives/*.deb "${rootfs}"/var/lib/apt/lists/* \
    "${rootfs}"/usr/share/doc/* "${rootfs}"/usr/share/man/* "${rootfs}"/usr/share/locale/*
  tar --numeric-owner -C "${rootfs}" -c . | podman import \
    --change 'CMD ["bash"]' --change 'ENV LANG=C.UTF-8' \
    --change "LABEL coupon-stream.standin=${hash}" \
    --change "LABEL org.opencontainers.image.description=offline stand-in for ${image}: debootstrap minbase" \
    - "${image}" >/dev/null 2>"${WORK}/import.log"
  rm -rf "${rootfs}"
}

# build_context IMAGE HASH DIR: podman build of a stand-in's Containerfile in DIR.
build_standin() {
  local image="$1" hash="$2" dir="$3"
  shift 3
  podman build --pull=never --network=host -q \
    --label "coupon-stream.standin=${hash}" \
    --label "org.opencontainers.image.description=offline stand-in for ${image}, from Debian's packages" \
    "$@" -t "${image}" -f "${dir}/Containerfile" "${dir}" >/dev/null
}

python_hash() { inputs_hash "${INFRA}/python" "$(base_hash)"; }
build_python() { ensure_base; build_standin "$1" "$2" "${INFRA}/python"; }

mysql_hash() { inputs_hash "${INFRA}/mysql" "$(base_hash)"; }
build_mysql() { ensure_base; build_standin "$1" "$2" "${INFRA}/mysql"; }

prometheus_hash() { inputs_hash "${INFRA}/prometheus" "$(base_hash)"; }
build_prometheus() { ensure_base; build_standin "$1" "$2" "${INFRA}/prometheus"; }

kafka_hash() { inputs_hash "${INFRA}/kafka" "${KAFKA_VERSION}" "$(base_hash)"; }
build_kafka() {
  ensure_base
  local ctx="${WORK}/kafka-context"
  local libs="${WORK}/kafka-libs-${KAFKA_VERSION}"
  if ! compgen -G "${libs}/kafka-tools-${KAFKA_VERSION}.jar" >/dev/null; then
    command -v mvn >/dev/null 2>&1 || {
      err "mvn not found (apt-get install -y maven)"
      exit 1
    }
    log "fetching the Kafka ${KAFKA_VERSION} jars (broker and tools) from Maven Central"
    rm -rf "${libs}.tmp"
    mvn -q -B -Dstyle.color=never -f "${INFRA}/kafka/pom.xml" -Dkafka.version="${KAFKA_VERSION}" \
      dependency:copy-dependencies -DoutputDirectory="${libs}.tmp" >"${WORK}/mvn.log" 2>&1 || {
      sed 's/\x1b\[[0-9;]*m//g' "${WORK}/mvn.log" | tail -n 20 >&2
      err "maven could not fetch the Kafka jars"
      exit 1
    }
    mv "${libs}.tmp" "${libs}"
  fi
  rm -rf "${ctx}"
  mkdir -p "${ctx}"
  cp -a "${INFRA}/kafka/." "${ctx}/"
  cp -a "${libs}" "${ctx}/libs"
  build_standin "$1" "$2" "${ctx}" --build-arg "KAFKA_VERSION=${KAFKA_VERSION}"
  rm -rf "${ctx}"
}

ensure_base() { ensure "${BASE_IMAGE}" "$(base_hash)" build_base; }
ensure_python() { ensure "${PYTHON_IMAGE}" "$(python_hash)" build_python; }

# -- the worker image -------------------------------------------------------------------------

build_worker() {
  ensure_python
  local -a secret=()
  local bundle=""
  if [[ -n "${COUPON_EXTRA_CA_DIR:-}" ]]; then
    if ! compgen -G "${COUPON_EXTRA_CA_DIR}/*.crt" >/dev/null; then
      err "COUPON_EXTRA_CA_DIR=${COUPON_EXTRA_CA_DIR} holds no *.crt files"
      exit 1
    fi
    bundle="$(mktemp "${WORK}/extra-ca.XXXXXX")"
    cat "${COUPON_EXTRA_CA_DIR}"/*.crt >"${bundle}"
    secret=(--secret "id=extra_ca,src=${bundle}")
    log "the build trusts the extra CA certificates in ${COUPON_EXTRA_CA_DIR} (COUPON_EXTRA_CA_DIR; a build secret, not stored in the image)"
  fi
  local t0=${SECONDS} rc=0
  log "building ${WORKER_IMAGE} from the Dockerfile"
  podman build --format docker --network=host "${secret[@]}" -t "${WORKER_IMAGE}" \
    -f "${REPO_ROOT}/Dockerfile" "${REPO_ROOT}" >"${WORK}/worker-build.log" 2>&1 || rc=$?
  [[ -n "${bundle}" ]] && rm -f "${bundle}"
  if [[ "${rc}" -ne 0 ]]; then
    tail -n 30 "${WORK}/worker-build.log" >&2
    if grep -q CERTIFICATE_VERIFY_FAILED "${WORK}/worker-build.log"; then
      err "HTTPS inside the build is re-signed by a proxy: give its CA certificates with COUPON_EXTRA_CA_DIR=<dir of *.crt>"
    fi
    err "podman build failed (log: .local/containers/worker-build.log)"
    exit 1
  fi
  log "${WORKER_IMAGE}: built in $((SECONDS - t0)) s ($(podman image inspect --format '{{.Size}}' "${WORKER_IMAGE}" | awk '{printf "%d MB", $1/1e6}'))"
}

cmd_all() {
  build_worker
  ensure "${KAFKA_IMAGE}" "$(kafka_hash)" build_kafka
  ensure "${MYSQL_IMAGE}" "$(mysql_hash)" build_mysql
  ensure "${PROMETHEUS_IMAGE}" "$(prometheus_hash)" build_prometheus
}

cmd_list() {
  local image
  for image in "${BASE_IMAGE}" "${PYTHON_IMAGE}" "${KAFKA_IMAGE}" "${MYSQL_IMAGE}" \
    "${PROMETHEUS_IMAGE}"; do
    if ! podman image exists "${image}"; then
      echo "${image} (missing)"
    elif [[ -n "$(label_of "${image}")" && "$(label_of "${image}")" != "<no value>" ]]; then
      echo "${image} (local stand-in)"
    else
      echo "${image}"
    fi
  done
  if podman image exists "${WORKER_IMAGE}"; then
    echo "${WORKER_IMAGE} (the Dockerfile, built $(podman image inspect --format '{{.Created}}' "${WORKER_IMAGE}" | cut -d. -f1))"
  else
    echo "${WORKER_IMAGE} (missing)"
  fi
}

main() {
  require_podman
  mkdir -p "${WORK}"
  local t0=${SECONDS}
  case "${1:-all}" in
    all)
      cmd_all
      log "images ready in $((SECONDS - t0)) s"
      ;;
    worker) build_worker ;;
    base)
      ensure_base
      echo "${BASE_IMAGE}"
      ;;
    list) cmd_list ;;
    *)
      echo "usage: $0 [all|worker|base|list]" >&2
      exit 2
      ;;
  esac
}

main "$@"
