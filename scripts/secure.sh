#!/usr/bin/env bash
# A secured local Kafka and a TLS-only MariaDB for the integration tests. They run
# next to the plain ones of scripts/services.sh (Kafka on 9092, MariaDB on 3306),
# never instead of them.
#
#   scripts/secure.sh start|stop|status|env
#   scripts/secure.sh kafka-acls ARGS...   # kafka-acls.sh flags, run as the super user
#
# start makes, once, and then reuses:
#   .local/secure/certs/         test certificates (openssl; all made again if one is missing)
#     ca.pem, ca.key               the test CA: signs server and client certificates
#     other-ca.pem, other-ca.key   a second CA that signs nothing used here
#     server.pem, server.key       SAN IP:127.0.0.1,DNS:localhost; broker and MariaDB
#     server.p12                   the same as a PKCS12 keystore (broker)
#     client.pem, client.key       CN=coupon, signed by ca (mutual TLS)
#     rogue-client.pem, .key       CN=coupon, signed by other-ca
#   .local/secure/kafka/         Kafka 3.9.1, KRaft, one node (the jars of scripts/kafka.sh;
#                                properties from infra/kafka/secure.properties):
#                                data/, logs/, server.properties, kafka.pid
#     127.0.0.1:19092  SASL_SSL, SCRAM-SHA-512 and PLAIN; users admin (super user) and
#                      coupon (only the ACLs that tests grant)
#     127.0.0.1:19093  SSL with client certificates; the certificate's CN is the user
#     127.0.0.1:19094  the KRaft controller, plaintext
#   .local/secure/admin.properties   --command-config for Kafka's tools, as admin
#   .local/secure/mariadb/       MariaDB from Debian's package (as scripts/mariadb.sh installs
#                                it) on 127.0.0.1:3307, TLS only: data/, mariadbd.log,
#                                mariadbd.pid; database coupons, user coupons (REQUIRE SSL)
#   .local/secure/mariadb.sock   its unix socket (root only; in /tmp if the repo path is long)
#
# env prints export lines (COUPON_SECURE_*) for tests and shells:
#   eval "$(bash scripts/secure.sh env)"
#
# The passwords below are fixed test passwords. The Kafka users are stored when the
# storage is formatted: after changing a Kafka password, run
#   bash scripts/secure.sh stop && rm -rf .local/secure/kafka
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${SCRIPT_DIR}/.." && pwd)"
# shellcheck source=scripts/kafka-started.sh
source "${SCRIPT_DIR}/kafka-started.sh"

# ---- test users and passwords (letters, digits, '.', '_', '-' only) ----
KAFKA_ADMIN_USER="admin"
KAFKA_ADMIN_PASSWORD="admin-secret"
KAFKA_USER="coupon"
KAFKA_PASSWORD="coupon-secret"
KEYSTORE_PASSWORD="keystore-secret"
DB_NAME="coupons"
DB_USER="coupons"
DB_PASSWORD="coupons"

HOST="127.0.0.1"
KAFKA_SASL_PORT="19092"
KAFKA_MTLS_PORT="19093"
KAFKA_CONTROLLER_PORT="19094"
DB_PORT="3307"

SECURE_HOME="${REPO_ROOT}/.local/secure"
CERTS_DIR="${SECURE_HOME}/certs"
ADMIN_PROPS="${SECURE_HOME}/admin.properties"

KAFKA_INFRA_DIR="${REPO_ROOT}/infra/kafka"
KAFKA_LIBS_DIR="${REPO_ROOT}/.local/kafka/libs" # shared with scripts/kafka.sh
KAFKA_HOME="${SECURE_HOME}/kafka"
KAFKA_DATA_DIR="${KAFKA_HOME}/data"
KAFKA_LOG_DIR="${KAFKA_HOME}/logs"
KAFKA_PROPS="${KAFKA_HOME}/server.properties"
KAFKA_PID_FILE="${KAFKA_HOME}/kafka.pid"
KAFKA_OUT="${KAFKA_LOG_DIR}/server.out"
KAFKA_SERVER_LOG="${KAFKA_LOG_DIR}/server.log"
KAFKA_USERS_STAMP="${KAFKA_HOME}/scram-users.sha256"
KAFKA_HEAP_OPTS="${SECURE_KAFKA_HEAP_OPTS:--Xmx512m -Xms128m}"

MARIADBD="/usr/sbin/mariadbd"
DB_HOME="${SECURE_HOME}/mariadb"
DB_DATA_DIR="${DB_HOME}/data"
DB_LOG="${DB_HOME}/mariadbd.log"
DB_PID_FILE="${DB_HOME}/mariadbd.pid"
# A unix socket path must be shorter than 108 bytes (sun_path); keep a margin.
DB_SOCKET="${SECURE_HOME}/mariadb.sock"
if ((${#DB_SOCKET} > 100)); then
  DB_SOCKET="/tmp/coupon-secure-$(printf '%s' "${REPO_ROOT}" | sha1sum | cut -c1-12).sock"
fi

START_TIMEOUT="${SECURE_START_TIMEOUT:-120}"
STOP_TIMEOUT="${SECURE_STOP_TIMEOUT:-30}"

log() { echo "[secure] $*"; }
err() { echo "[secure] ERROR: $*" >&2; }

require_cmd() {
  if ! command -v "$1" >/dev/null 2>&1; then
    err "'$1' not found on PATH ($2)"
    exit 1
  fi
}

check_secrets() {
  local v
  for v in "${KAFKA_ADMIN_USER}" "${KAFKA_ADMIN_PASSWORD}" "${KAFKA_USER}" "${KAFKA_PASSWORD}" \
    "${KEYSTORE_PASSWORD}" "${DB_NAME}" "${DB_USER}" "${DB_PASSWORD}"; do
    # They go into JAAS strings, SCRAM specs, sed replacements and SQL unescaped.
    if [[ ! "${v}" =~ ^[A-Za-z0-9._-]+$ ]]; then
      err "user names and passwords at the top of $0 must match [A-Za-z0-9._-]+ (got '${v}')"
      exit 1
    fi
  done
}

port_open() {
  timeout 2 bash -c "exec 3<>/dev/tcp/${HOST}/$1" 2>/dev/null
}

# Escapes a string for the replacement side of sed 's|...|...|'.
sed_repl() {
  printf '%s' "$1" | sed -e 's/[\\|&]/\\&/g'
}

# Prints the pid in file $1 if that process is alive, else returns 1.
pid_from_file() {
  local pid
  [[ -f "$1" ]] || return 1
  pid="$(cat "$1" 2>/dev/null || true)"
  if [[ "${pid}" =~ ^[0-9]+$ ]] && kill -0 "${pid}" 2>/dev/null; then
    echo "${pid}"
    return 0
  fi
  return 1
}

# SIGTERM was sent (or a shutdown asked for): waits for $1 to exit, SIGKILL after the timeout.
wait_exit_or_kill() {
  local pid="$1" what="$2"
  local deadline=$((SECONDS + STOP_TIMEOUT))
  while kill -0 "${pid}" 2>/dev/null && ((SECONDS < deadline)); do
    sleep 0.5
  done
  if kill -0 "${pid}" 2>/dev/null; then
    log "${what} still running after ${STOP_TIMEOUT} s; sending SIGKILL"
    kill -KILL "${pid}" 2>/dev/null || true
    while kill -0 "${pid}" 2>/dev/null; do
      sleep 0.2
    done
  fi
}

# ---------------------------------------------------------------- certificates

CERT_FILES=(ca.pem ca.key other-ca.pem other-ca.key server.pem server.key server.p12
  client.pem client.key rogue-client.pem rogue-client.key)

certs_complete() {
  local f
  for f in "${CERT_FILES[@]}"; do
    [[ -s "${CERTS_DIR}/${f}" ]] || return 1
  done
}

write_openssl_cnf() {
  # Extensions that OpenSSL 3's strict verification (Python 3.13's default
  # VERIFY_X509_STRICT) asks for: critical CA constraints and key usage, key identifiers.
  cat >"$1" <<'EOF'
[req]
distinguished_name = req_dn
[req_dn]

[ca_ext]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always

[server_ext]
basicConstraints = CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always

[client_ext]
basicConstraints = CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
EOF
}

new_key() {
  openssl genpkey -quiet -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$1"
}

serial() {
  echo "0x$(openssl rand -hex 16)"
}

# make_ca DIR NAME SUBJECT
make_ca() {
  local dir="$1" name="$2" subject="$3"
  new_key "${dir}/${name}.key"
  openssl req -x509 -new -key "${dir}/${name}.key" -subj "${subject}" -sha256 -days 3650 \
    -set_serial "$(serial)" -config "${dir}/openssl.cnf" -extensions ca_ext \
    -out "${dir}/${name}.pem"
}

# make_leaf DIR NAME CA EXTENSIONS SUBJECT
make_leaf() {
  local dir="$1" name="$2" ca="$3" ext="$4" subject="$5"
  new_key "${dir}/${name}.key"
  openssl req -new -key "${dir}/${name}.key" -subj "${subject}" -config "${dir}/openssl.cnf" \
    -out "${dir}/${name}.csr"
  openssl x509 -req -in "${dir}/${name}.csr" -CA "${dir}/${ca}.pem" -CAkey "${dir}/${ca}.key" \
    -set_serial "$(serial)" -sha256 -days 3650 \
    -extfile "${dir}/openssl.cnf" -extensions "${ext}" -out "${dir}/${name}.pem" 2>/dev/null
  rm -f "${dir}/${name}.csr"
}

ensure_certs() {
  if certs_complete; then
    return 0
  fi
  require_cmd openssl "install it, e.g. apt-get install -y openssl"
  log "generating test certificates in .local/secure/certs"
  local tmp="${SECURE_HOME}/certs.tmp"
  rm -rf "${tmp}"
  mkdir -p "${tmp}"
  (
    umask 077 # keys: readable by the current user only
    write_openssl_cnf "${tmp}/openssl.cnf"
    make_ca "${tmp}" ca "/CN=coupon-stream test CA"
    make_ca "${tmp}" other-ca "/CN=coupon-stream other CA"
    make_leaf "${tmp}" server ca server_ext "/CN=localhost"
    make_leaf "${tmp}" client ca client_ext "/CN=${KAFKA_USER}"
    make_leaf "${tmp}" rogue-client other-ca client_ext "/CN=${KAFKA_USER}"
    SECURE_KEYSTORE_PASSWORD="${KEYSTORE_PASSWORD}" openssl pkcs12 -export -name server \
      -in "${tmp}/server.pem" -inkey "${tmp}/server.key" -certfile "${tmp}/ca.pem" \
      -passout env:SECURE_KEYSTORE_PASSWORD -out "${tmp}/server.p12"
    rm -f "${tmp}/openssl.cnf"
  )
  chmod 0644 "${tmp}"/*.pem
  chmod 0600 "${tmp}"/*.key "${tmp}/server.p12"
  chmod 0755 "${tmp}"
  rm -rf "${CERTS_DIR}"
  mv "${tmp}" "${CERTS_DIR}"
  if kafka_pid >/dev/null || db_is_up; then
    log "WARNING: new certificates while a secured service runs; restart them: $0 stop && $0 start"
  fi
}

# ---------------------------------------------------------------- Kafka

kafka_pid() {
  local pid
  if pid_from_file "${KAFKA_PID_FILE}"; then
    return 0
  fi
  # A broker of this checkout that lost its pid file.
  pid="$(pgrep -f -- "kafka\\.Kafka ${KAFKA_PROPS}" | head -n 1 || true)"
  if [[ -n "${pid}" ]]; then
    echo "${pid}"
    return 0
  fi
  return 1
}

kafka_java_base() {
  printf '%s\n' \
    -cp "${KAFKA_LIBS_DIR}/*" \
    -Dlog4j.configuration="file:${KAFKA_INFRA_DIR}/log4j.properties" \
    -Dkafka.logs.dir="${KAFKA_LOG_DIR}"
}

# Kafka's command-line tools, from the broker's jars (log4j warnings to stderr).
kafka_tool() {
  java -Xmx256m -cp "${KAFKA_LIBS_DIR}/*" \
    -Dlog4j.configuration="file:${KAFKA_INFRA_DIR}/tools-log4j.properties" "$@"
}

kafka_write_config() {
  mkdir -p "${KAFKA_DATA_DIR}" "${KAFKA_LOG_DIR}"
  sed -e "s|@DATA_DIR@|$(sed_repl "${KAFKA_DATA_DIR}")|g" \
    -e "s|@CERTS_DIR@|$(sed_repl "${CERTS_DIR}")|g" \
    -e "s|@KEYSTORE_PASSWORD@|$(sed_repl "${KEYSTORE_PASSWORD}")|g" \
    -e "s|@ADMIN_PASSWORD@|$(sed_repl "${KAFKA_ADMIN_PASSWORD}")|g" \
    -e "s|@COUPON_PASSWORD@|$(sed_repl "${KAFKA_PASSWORD}")|g" \
    "${KAFKA_INFRA_DIR}/secure.properties" >"${KAFKA_PROPS}.tmp"
  if grep -n '@[A-Z_]*@' "${KAFKA_PROPS}.tmp" >&2; then
    err "unfilled placeholders in infra/kafka/secure.properties (above)"
    exit 1
  fi
  mv "${KAFKA_PROPS}.tmp" "${KAFKA_PROPS}"

  cat >"${ADMIN_PROPS}.tmp" <<EOF
# Written by scripts/secure.sh: the super user of the secured broker, for
#   --bootstrap-server ${HOST}:${KAFKA_SASL_PORT} --command-config .local/secure/admin.properties
security.protocol=SASL_SSL
sasl.mechanism=SCRAM-SHA-512
sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="${KAFKA_ADMIN_USER}" password="${KAFKA_ADMIN_PASSWORD}";
ssl.truststore.type=PEM
ssl.truststore.location=${CERTS_DIR}/ca.pem
EOF
  mv "${ADMIN_PROPS}.tmp" "${ADMIN_PROPS}"
}

kafka_users_digest() {
  printf '%s\n' "${KAFKA_ADMIN_USER}:${KAFKA_ADMIN_PASSWORD}" "${KAFKA_USER}:${KAFKA_PASSWORD}" \
    | sha256sum | cut -d' ' -f1
}

kafka_format_storage() {
  local digest
  digest="$(kafka_users_digest)"
  if [[ -f "${KAFKA_DATA_DIR}/meta.properties" ]]; then
    if [[ -f "${KAFKA_USERS_STAMP}" && "$(cat "${KAFKA_USERS_STAMP}")" != "${digest}" ]]; then
      err "the Kafka users or passwords changed since .local/secure/kafka was formatted;"
      err "run: $0 stop && rm -rf .local/secure/kafka && $0 start"
      exit 1
    fi
    return 0
  fi
  local -a base
  mapfile -t base < <(kafka_java_base)
  local cluster_id
  cluster_id="$(java "${base[@]}" kafka.tools.StorageTool random-uuid 2>>"${KAFKA_OUT}" | tail -n 1)"
  if [[ -z "${cluster_id}" ]]; then
    err "could not generate a cluster id (see .local/secure/kafka/logs/server.out)"
    exit 1
  fi
  log "kafka: formatting storage in .local/secure/kafka/data (cluster id ${cluster_id}; SCRAM users ${KAFKA_ADMIN_USER}, ${KAFKA_USER})"
  if ! java "${base[@]}" kafka.tools.StorageTool format \
    --config "${KAFKA_PROPS}" --cluster-id "${cluster_id}" \
    --add-scram "SCRAM-SHA-512=[name=${KAFKA_ADMIN_USER},password=${KAFKA_ADMIN_PASSWORD}]" \
    --add-scram "SCRAM-SHA-512=[name=${KAFKA_USER},password=${KAFKA_PASSWORD}]" \
    >>"${KAFKA_OUT}" 2>&1; then
    err "storage format failed; tail of .local/secure/kafka/logs/server.out:"
    tail -n 30 "${KAFKA_OUT}" >&2 || true
    exit 1
  fi
  echo "${digest}" >"${KAFKA_USERS_STAMP}"
}

# An authenticated admin request over SASL_SSL: TLS, SCRAM and the authorizer all work.
# The output of the last failed attempt is kept in KAFKA_ADMIN_ERR.
KAFKA_ADMIN_ERR=""
kafka_admin_ok() {
  local out
  if out="$(timeout 60 java -Xmx256m -cp "${KAFKA_LIBS_DIR}/*" \
    -Dlog4j.configuration="file:${KAFKA_INFRA_DIR}/tools-log4j.properties" \
    kafka.admin.AclCommand --bootstrap-server "${HOST}:${KAFKA_SASL_PORT}" \
    --command-config "${ADMIN_PROPS}" --list 2>&1)"; then
    return 0
  fi
  KAFKA_ADMIN_ERR="${out}"
  return 1
}

kafka_show_log_tail() {
  echo "---- tail of .local/secure/kafka/logs/server.log ----" >&2
  tail -n 40 "${KAFKA_SERVER_LOG}" >&2 2>/dev/null || true
  echo "---- tail of .local/secure/kafka/logs/server.out ----" >&2
  tail -n 20 "${KAFKA_OUT}" >&2 2>/dev/null || true
}

kafka_wait_ready() {
  local pid="$1" since="$2"
  local deadline=$((SECONDS + START_TIMEOUT))
  local listening=0
  while ((SECONDS < deadline)); do
    if ! kill -0 "${pid}" 2>/dev/null; then
      rm -f "${KAFKA_PID_FILE}"
      err "kafka: broker process ${pid} exited during start-up"
      kafka_show_log_tail
      return 1
    fi
    if ((listening == 0)) && port_open "${KAFKA_SASL_PORT}" && kafka_started_since "${KAFKA_SERVER_LOG}" "${since}"; then
      listening=1
    fi
    if ((listening == 1)) && kafka_admin_ok; then
      return 0
    fi
    sleep 0.5
  done
  if ((listening == 1)); then
    err "kafka: broker listens on ${HOST}:${KAFKA_SASL_PORT} but an admin request as '${KAFKA_ADMIN_USER}' did not succeed within ${START_TIMEOUT} s (pid ${pid} left running)"
    echo "---- last output of kafka.admin.AclCommand --list ----" >&2
    printf '%s\n' "${KAFKA_ADMIN_ERR}" | tail -n 20 >&2
  else
    err "kafka: broker not ready on ${HOST}:${KAFKA_SASL_PORT} after ${START_TIMEOUT} s (pid ${pid} left running)"
  fi
  kafka_show_log_tail
  return 1
}

kafka_start() {
  local pid t0=${SECONDS}
  if pid="$(kafka_pid)"; then
    if port_open "${KAFKA_SASL_PORT}" && kafka_admin_ok; then
      log "kafka: already running (pid ${pid}) on ${HOST}:${KAFKA_SASL_PORT} and ${HOST}:${KAFKA_MTLS_PORT}"
      return 0
    fi
    log "kafka: broker process ${pid} exists but is not ready yet; waiting for it..."
    kafka_wait_ready "${pid}" "" || return 1
    log "kafka: ready (pid ${pid})"
    return 0
  fi
  local port
  for port in "${KAFKA_SASL_PORT}" "${KAFKA_MTLS_PORT}" "${KAFKA_CONTROLLER_PORT}"; do
    if port_open "${port}"; then
      err "kafka: ${HOST}:${port} is taken by a process this script did not start"
      return 1
    fi
  done

  require_cmd java "install a JDK 17, e.g. apt-get install -y openjdk-17-jre-headless"
  bash "${SCRIPT_DIR}/kafka.sh" libs # fetches the jars only if they are missing
  kafka_write_config
  kafka_format_storage

  local -a base heap
  mapfile -t base < <(kafka_java_base)
  read -r -a heap <<<"${KAFKA_HEAP_OPTS}"
  local started
  started="$(kafka_log_stamp)"
  log "kafka: starting broker (logs in .local/secure/kafka/logs/)"
  (
    cd "${KAFKA_HOME}"
    echo "==== $(date '+%Y-%m-%d %H:%M:%S') starting kafka.Kafka ====" >>"${KAFKA_OUT}"
    exec setsid nohup java "${heap[@]}" \
      -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 \
      -XX:+ExplicitGCInvokesConcurrent -Djava.awt.headless=true \
      "${base[@]}" \
      kafka.Kafka "${KAFKA_PROPS}" >>"${KAFKA_OUT}" 2>&1 </dev/null
  ) &
  pid=$!
  echo "${pid}" >"${KAFKA_PID_FILE}"
  kafka_wait_ready "${pid}" "${started}" || return 1
  log "kafka: ready on ${HOST}:${KAFKA_SASL_PORT} (SASL_SSL) and ${HOST}:${KAFKA_MTLS_PORT} (mutual TLS) (pid ${pid}, took $((SECONDS - t0)) s)"
}

kafka_stop() {
  local pid
  if ! pid="$(kafka_pid)"; then
    rm -f "${KAFKA_PID_FILE}"
    log "kafka: not running"
    return 0
  fi
  log "kafka: stopping broker (pid ${pid}, SIGTERM)..."
  kill -TERM "${pid}" 2>/dev/null || true
  wait_exit_or_kill "${pid}" "kafka broker"
  rm -f "${KAFKA_PID_FILE}"
  local deadline=$((SECONDS + 5))
  while port_open "${KAFKA_SASL_PORT}" && ((SECONDS < deadline)); do
    sleep 0.5
  done
  log "kafka: stopped"
}

kafka_status() {
  local pid
  if pid="$(kafka_pid)"; then
    if port_open "${KAFKA_SASL_PORT}" && port_open "${KAFKA_MTLS_PORT}"; then
      log "kafka: running (pid ${pid}) on ${HOST}:${KAFKA_SASL_PORT} (SASL_SSL) and ${HOST}:${KAFKA_MTLS_PORT} (mutual TLS)"
      return 0
    fi
    log "kafka: process ${pid} exists but ${HOST}:${KAFKA_SASL_PORT} is not answering"
    return 1
  fi
  log "kafka: not running"
  return 1
}

# ---------------------------------------------------------------- MariaDB

# Root over the unix socket of this server only; --no-defaults keeps Debian's option
# files (socket, pid file of the project's server in /run/mysqld) out of it.
db_client_opts() {
  printf '%s\n' --no-defaults --protocol=socket --socket="${DB_SOCKET}" --user=root
}

db_admin() {
  local -a opts
  mapfile -t opts < <(db_client_opts)
  mariadb-admin "${opts[@]}" "$@"
}

db_sql() {
  local -a opts
  mapfile -t opts < <(db_client_opts)
  mariadb "${opts[@]}" "$@"
}

db_is_up() {
  [[ -S "${DB_SOCKET}" ]] || return 1
  command -v mariadb-admin >/dev/null 2>&1 || return 1
  db_admin --connect-timeout=2 ping >/dev/null 2>&1
}

db_pid() {
  local pid
  if pid_from_file "${DB_PID_FILE}"; then
    return 0
  fi
  pid="$(pgrep -f -- "mariadbd .*--datadir=${DB_DATA_DIR}( |$)" | head -n 1 || true)"
  if [[ -n "${pid}" ]]; then
    echo "${pid}"
    return 0
  fi
  return 1
}

db_ensure_datadir() {
  if [[ -d "${DB_DATA_DIR}/mysql" ]]; then
    return 0
  fi
  log "mariadb: initialising the system tables in .local/secure/mariadb/data"
  rm -rf "${DB_DATA_DIR}"
  mkdir -p "${DB_DATA_DIR}"
  if ! mariadb-install-db --no-defaults --user=root --datadir="${DB_DATA_DIR}" \
    --auth-root-authentication-method=socket --skip-test-db >>"${DB_LOG}" 2>&1; then
    err "mariadb-install-db failed; tail of .local/secure/mariadb/mariadbd.log:"
    tail -n 30 "${DB_LOG}" >&2 || true
    rm -rf "${DB_DATA_DIR}"
    exit 1
  fi
}

db_ensure_db_and_user() {
  local host sql
  sql="CREATE DATABASE IF NOT EXISTS \`${DB_NAME}\`;"
  for host in 127.0.0.1 localhost; do
    sql+="
CREATE USER IF NOT EXISTS '${DB_USER}'@'${host}' IDENTIFIED BY '${DB_PASSWORD}' REQUIRE SSL;
ALTER USER '${DB_USER}'@'${host}' IDENTIFIED BY '${DB_PASSWORD}' REQUIRE SSL;
GRANT ALL PRIVILEGES ON \`${DB_NAME}\`.* TO '${DB_USER}'@'${host}';"
  done
  sql+="
FLUSH PRIVILEGES;"
  if ! db_sql <<<"${sql}"; then
    err "mariadb: could not create database '${DB_NAME}' / user '${DB_USER}'"
    exit 1
  fi
  log "mariadb: database '${DB_NAME}' and user '${DB_USER}'@127.0.0.1/localhost (REQUIRE SSL) ready"
}

db_start() {
  local pid t0=${SECONDS}
  if db_is_up; then
    log "mariadb: already running on ${HOST}:${DB_PORT}"
    db_ensure_db_and_user
    return 0
  fi
  bash "${SCRIPT_DIR}/mariadb.sh" install # installs mariadb-server only if it is missing
  mkdir -p "${DB_HOME}"
  db_ensure_datadir

  if pid="$(db_pid)"; then
    log "mariadb: mariadbd (pid ${pid}) exists but does not answer yet; waiting for it..."
  else
    if port_open "${DB_PORT}"; then
      err "mariadb: ${HOST}:${DB_PORT} is taken by a process this script did not start"
      return 1
    fi
    rm -f "${DB_SOCKET}"
    log "mariadb: starting mariadbd (log in .local/secure/mariadb/mariadbd.log)"
    echo "==== $(date '+%Y-%m-%d %H:%M:%S') starting mariadbd ====" >>"${DB_LOG}"
    setsid nohup "${MARIADBD}" --no-defaults --user=root --datadir="${DB_DATA_DIR}" \
      --port="${DB_PORT}" --bind-address="${HOST}" --socket="${DB_SOCKET}" \
      --pid-file="${DB_PID_FILE}" \
      --character-set-server=utf8mb4 --collation-server=utf8mb4_general_ci \
      --ssl-ca="${CERTS_DIR}/ca.pem" --ssl-cert="${CERTS_DIR}/server.pem" \
      --ssl-key="${CERTS_DIR}/server.key" --require-secure-transport=ON \
      >>"${DB_LOG}" 2>&1 </dev/null &
    pid=$!
    echo "${pid}" >"${DB_PID_FILE}"
  fi

  local deadline=$((SECONDS + START_TIMEOUT))
  # Only the socket is polled: a TCP probe would log "Aborted connection" each time, and
  # mariadbd gives up at start-up if it cannot listen on its port.
  until db_is_up; do
    if ! kill -0 "${pid}" 2>/dev/null; then
      rm -f "${DB_PID_FILE}"
      err "mariadb: mariadbd exited during start-up; tail of .local/secure/mariadb/mariadbd.log:"
      tail -n 30 "${DB_LOG}" >&2 || true
      return 1
    fi
    if ((SECONDS >= deadline)); then
      err "mariadb: no answer within ${START_TIMEOUT} s (pid ${pid} left running)"
      tail -n 30 "${DB_LOG}" >&2 || true
      return 1
    fi
    sleep 0.5
  done
  log "mariadb: ready on ${HOST}:${DB_PORT}, TLS only (pid ${pid}, took $((SECONDS - t0)) s)"
  db_ensure_db_and_user
}

db_stop() {
  local pid=""
  pid="$(db_pid || true)"
  if db_is_up; then
    log "mariadb: shutting down..."
    db_admin shutdown || true
  elif [[ -n "${pid}" ]]; then
    log "mariadb: mariadbd (pid ${pid}) does not answer; sending SIGTERM"
    kill -TERM "${pid}" 2>/dev/null || true
  else
    rm -f "${DB_PID_FILE}"
    log "mariadb: not running"
    return 0
  fi
  if [[ -n "${pid}" ]]; then
    wait_exit_or_kill "${pid}" "mariadbd"
  fi
  rm -f "${DB_PID_FILE}"
  log "mariadb: stopped"
}

db_status() {
  if db_is_up; then
    log "mariadb: running (pid $(db_pid || echo '?')) on ${HOST}:${DB_PORT}, TLS only"
    return 0
  fi
  local pid
  if pid="$(db_pid)"; then
    log "mariadb: process ${pid} exists but does not answer"
  else
    log "mariadb: not running"
  fi
  return 1
}

# ---------------------------------------------------------------- commands

cmd_start() {
  local t0=${SECONDS}
  check_secrets
  mkdir -p "${SECURE_HOME}"
  ensure_certs
  kafka_start
  db_start
  log "up in $((SECONDS - t0)) s; for tests and shells: eval \"\$(bash scripts/secure.sh env)\""
}

cmd_stop() {
  local rc=0
  kafka_stop || rc=1
  db_stop || rc=1
  return "${rc}"
}

cmd_status() {
  local rc=0
  kafka_status || rc=1
  db_status || rc=1
  return "${rc}"
}

cmd_env() {
  local -a pairs=(
    COUPON_SECURE_BOOTSTRAP "${HOST}:${KAFKA_SASL_PORT}"
    COUPON_SECURE_MTLS_BOOTSTRAP "${HOST}:${KAFKA_MTLS_PORT}"
    COUPON_SECURE_CERTS "${CERTS_DIR}"
    COUPON_SECURE_ADMIN_CONFIG "${ADMIN_PROPS}"
    COUPON_SECURE_ADMIN_USER "${KAFKA_ADMIN_USER}"
    COUPON_SECURE_ADMIN_PASSWORD "${KAFKA_ADMIN_PASSWORD}"
    COUPON_SECURE_USER "${KAFKA_USER}"
    COUPON_SECURE_PASSWORD "${KAFKA_PASSWORD}"
    COUPON_SECURE_DB_URL "mysql+asyncmy://${DB_USER}:${DB_PASSWORD}@${HOST}:${DB_PORT}/${DB_NAME}"
    COUPON_SECURE_DB_USER "${DB_USER}"
    COUPON_SECURE_DB_PASSWORD "${DB_PASSWORD}"
  )
  local i
  for ((i = 0; i < ${#pairs[@]}; i += 2)); do
    printf 'export %s=%q\n' "${pairs[i]}" "${pairs[i + 1]}"
  done
}

cmd_kafka_acls() {
  if [[ ! -f "${ADMIN_PROPS}" ]] || ! port_open "${KAFKA_SASL_PORT}"; then
    err "the secured Kafka is not running on ${HOST}:${KAFKA_SASL_PORT}; run: $0 start"
    exit 1
  fi
  require_cmd java "install a JDK 17, e.g. apt-get install -y openjdk-17-jre-headless"
  kafka_tool kafka.admin.AclCommand --bootstrap-server "${HOST}:${KAFKA_SASL_PORT}" \
    --command-config "${ADMIN_PROPS}" "$@"
}

usage() {
  echo "usage: $0 start|stop|status|env" >&2
  echo "       $0 kafka-acls ARGS...   (kafka-acls.sh flags, as ${KAFKA_ADMIN_USER}; e.g. --list)" >&2
}

main() {
  if [[ $# -lt 1 ]]; then
    usage
    exit 2
  fi
  local cmd="$1"
  shift
  if [[ "${cmd}" != kafka-acls && $# -ne 0 ]]; then
    usage
    exit 2
  fi
  case "${cmd}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) cmd_env ;;
    kafka-acls) cmd_kafka_acls "$@" ;;
    -h | --help | help) usage ;;
    *)
      usage
      exit 2
      ;;
  esac
}

main "$@"
