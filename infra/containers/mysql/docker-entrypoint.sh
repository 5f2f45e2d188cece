#!/bin/bash
# Entrypoint of the MySQL stand-in: on an empty data dir, create the system tables, the root
# password, the database and the user of the MYSQL_* variables (as the official image does,
# through a server on a socket only); then run the server on all interfaces as mysql.
set -euo pipefail
if [[ "${1:-}" == -* ]]; then
  set -- mysqld "$@"
fi
if [[ "${1:-}" != mysqld && "${1:-}" != mariadbd ]]; then
  exec "$@"
fi
shift
datadir=/var/lib/mysql
install -d -o mysql -g mysql -m 0755 "${datadir}" /run/mysqld

sql_string() { printf "'%s'" "${1//\'/\'\'}"; }

if [[ ! -d "${datadir}/mysql" ]]; then
  if [[ -z "${MYSQL_ROOT_PASSWORD:-}" && -z "${MYSQL_ALLOW_EMPTY_PASSWORD:-}" ]]; then
    echo "docker-entrypoint: set MYSQL_ROOT_PASSWORD (or MYSQL_ALLOW_EMPTY_PASSWORD)" >&2
    exit 1
  fi
  echo "docker-entrypoint: initialising ${datadir}"
  mariadb-install-db --user=mysql --datadir="${datadir}" --skip-test-db \
    --auth-root-authentication-method=normal >/dev/null
  mariadbd --user=mysql --datadir="${datadir}" --skip-networking \
    --socket=/run/mysqld/init.sock &
  pid=$!
  for _ in $(seq 60); do
    mariadb-admin --socket=/run/mysqld/init.sock ping >/dev/null 2>&1 && break
    sleep 1
  done
  root_pw="$(sql_string "${MYSQL_ROOT_PASSWORD:-}")"
  sql="ALTER USER 'root'@'localhost' IDENTIFIED BY ${root_pw};
CREATE USER 'root'@'%' IDENTIFIED BY ${root_pw};
GRANT ALL PRIVILEGES ON *.* TO 'root'@'%' WITH GRANT OPTION;"
  if [[ -n "${MYSQL_DATABASE:-}" ]]; then
    sql+="
CREATE DATABASE IF NOT EXISTS \`${MYSQL_DATABASE}\`;"
  fi
  if [[ -n "${MYSQL_USER:-}" ]]; then
    sql+="
CREATE USER '${MYSQL_USER}'@'%' IDENTIFIED BY $(sql_string "${MYSQL_PASSWORD:-}");"
    if [[ -n "${MYSQL_DATABASE:-}" ]]; then
      sql+="
GRANT ALL PRIVILEGES ON \`${MYSQL_DATABASE}\`.* TO '${MYSQL_USER}'@'%';"
    fi
  fi
  mariadb --socket=/run/mysqld/init.sock -uroot <<<"${sql}
FLUSH PRIVILEGES;"
  mariadb-admin --socket=/run/mysqld/init.sock -uroot -p"${MYSQL_ROOT_PASSWORD:-}" shutdown
  wait "${pid}" || true
  echo "docker-entrypoint: ready for start-up"
fi
exec mariadbd --user=mysql --datadir="${datadir}" --bind-address=0.0.0.0 --port=3306 "$@"
