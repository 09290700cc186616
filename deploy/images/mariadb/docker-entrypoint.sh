#!/usr/bin/env bash
# Entrypoint of the substitute mariadb image (deploy/images/mariadb), written for this project
# with the official image's interface, in this subset:
#
#   MARIADB_ROOT_PASSWORD              root's password (root@localhost and root@'%'); or
#   MARIADB_ALLOW_EMPTY_ROOT_PASSWORD  =1 (or yes): root without a password. One is required
#   MARIADB_DATABASE                   a database created at init
#   MARIADB_USER, MARIADB_PASSWORD     a user@'%' created at init, with every privilege on
#                                      MARIADB_DATABASE (when set)
#   /docker-entrypoint-initdb.d/*.sql, *.sql.gz, *.sh
#                                      run once, in name order, when the data directory is
#                                      initialised (SQL as root, in MARIADB_DATABASE if set)
#   command                            `mariadbd [--option=value ...]` (or just the options);
#                                      anything else runs as given
#
# As the official image: the data directory (/var/lib/mysql) is initialised only when it holds
# no system tables; init runs against a temporary server with networking off, started with the
# same options, so nothing connects over TCP before init is done, and only the real server logs
# "ready for connections" with "port: 3306" (what wait strategies such as testcontainers' look
# for: the temporary one says "port: 0"). The log goes to stderr.
set -Eeuo pipefail

say() { printf '%s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

DATADIR=/var/lib/mysql
SOCKET=/run/mysqld/mysqld.sock
# The temporary server usually answers within a second; InnoDB's first start makes its files.
TEMP_SERVER_TIMEOUT_S=60

# `docker run mariadb:10.11 --log-bin` means `mariadbd --log-bin`.
if [[ ${1:-} == -* ]]; then
  set -- mariadbd "$@"
fi

if [[ ${1:-} != mariadbd && ${1:-} != mysqld ]] \
  || [[ " $* " == *" --help "* || " $* " == *" --version "* || " $* " == *" -V "* ]]; then
  exec "$@"
fi

# As root: own the data and socket directories, then run this script again as mysql.
if [[ $(id -u) == 0 ]]; then
  mkdir -p "$DATADIR" /run/mysqld
  chown mysql:mysql "$DATADIR" /run/mysqld
  exec gosu mysql "${BASH_SOURCE[0]}" "$@"
fi

truthy() { [[ ${1:-} =~ ^(1|yes|true)$ ]]; }

# Quotes $1 as an SQL string literal.
sql_string() {
  local s="${1//\\/\\\\}"
  printf "'%s'" "${s//\'/\\\'}"
}

# Quotes $1 as an SQL identifier.
# shellcheck disable=SC2016  # the backquotes are SQL's
sql_ident() { printf '`%s`' "${1//\`/\`\`}"; }

# Init. The system tables are made without the user's binlog (as the official image: they
# are not replicated), then a temporary server with the user's options runs the setup.
init() {
  local server=("$@")
  if [[ -z ${MARIADB_ROOT_PASSWORD:-} ]] && ! truthy "${MARIADB_ALLOW_EMPTY_ROOT_PASSWORD:-}"; then
    die "the database is uninitialized and neither MARIADB_ROOT_PASSWORD nor \
MARIADB_ALLOW_EMPTY_ROOT_PASSWORD is set: set one (docker run -e MARIADB_ROOT_PASSWORD=...)"
  fi
  if [[ -n ${MARIADB_USER:-} && -z ${MARIADB_PASSWORD:-} ]]; then
    die "MARIADB_USER=$MARIADB_USER is set without MARIADB_PASSWORD"
  fi
  [[ ${MARIADB_USER:-} != root ]] || die "MARIADB_USER=root: root is made from MARIADB_ROOT_PASSWORD"

  say "initializing the data directory $DATADIR"
  mariadb-install-db --datadir="$DATADIR" --auth-root-authentication-method=normal --skip-test-db \
    --default-time-zone=SYSTEM "${server[@]:1}" --skip-log-bin >/dev/null

  say "starting a temporary server (networking off)"
  "${server[@]}" --skip-networking --socket="$SOCKET" --skip-log-bin --expire-logs-days=0 \
    --loose-innodb-buffer-pool-load-at-startup=0 &
  local pid=$! deadline=$((SECONDS + TEMP_SERVER_TIMEOUT_S))
  local client=(mariadb --no-defaults --protocol=socket --socket="$SOCKET" -uroot)
  until "${client[@]}" -e 'SELECT 1' >/dev/null 2>&1; do
    kill -0 "$pid" 2>/dev/null || die "the temporary server exited during init (its log is above)"
    ((SECONDS < deadline)) || die "the temporary server did not answer within ${TEMP_SERVER_TIMEOUT_S}s"
    sleep 0.1
  done

  local setup="" root_pw="${MARIADB_ROOT_PASSWORD:-}"
  # root@'%' as the official image's default MARIADB_ROOT_HOST; the anonymous and host-named
  # accounts install-db may make are dropped.
  setup+="DELETE FROM mysql.global_priv WHERE user NOT IN ('mysql', 'mariadb.sys', 'root') OR host NOT IN ('localhost');"
  setup+="DELETE FROM mysql.proxies_priv WHERE NOT (user = 'root' AND host = 'localhost');"
  setup+="FLUSH PRIVILEGES;"
  setup+="CREATE USER 'root'@'%' IDENTIFIED BY $(sql_string "$root_pw");"
  setup+="GRANT ALL ON *.* TO 'root'@'%' WITH GRANT OPTION;"
  setup+="GRANT PROXY ON ''@'%' TO 'root'@'%' WITH GRANT OPTION;"
  if [[ -n ${MARIADB_DATABASE:-} ]]; then
    setup+="CREATE DATABASE IF NOT EXISTS $(sql_ident "$MARIADB_DATABASE");"
  fi
  if [[ -n ${MARIADB_USER:-} ]]; then
    setup+="CREATE USER $(sql_string "$MARIADB_USER")@'%' IDENTIFIED BY $(sql_string "$MARIADB_PASSWORD");"
    if [[ -n ${MARIADB_DATABASE:-} ]]; then
      setup+="GRANT ALL ON $(sql_ident "$MARIADB_DATABASE").* TO $(sql_string "$MARIADB_USER")@'%';"
    fi
  fi
  "${client[@]}" -e "$setup"

  local sql=("${client[@]}" ${MARIADB_DATABASE:+"--database=$MARIADB_DATABASE"})
  shopt -s nullglob
  local f
  for f in /docker-entrypoint-initdb.d/*; do
    case "$f" in
      *.sh)
        if [[ -x $f ]]; then
          say "running $f"
          "$f"
        else
          say "sourcing $f"
          # shellcheck disable=SC1090  # the user's script
          . "$f"
        fi
        ;;
      *.sql) say "running $f"; "${sql[@]}" <"$f" ;;
      *.sql.gz) say "running $f"; gunzip -c "$f" | "${sql[@]}" ;;
      *) say "ignoring $f" ;;
    esac
  done
  shopt -u nullglob

  # root's password last: everything above ran as root without one.
  "${client[@]}" -e "ALTER USER 'root'@'localhost' IDENTIFIED BY $(sql_string "$root_pw");"

  # SIGTERM is mariadbd's clean shutdown; wait (bounded) for it.
  kill -TERM "$pid"
  deadline=$((SECONDS + TEMP_SERVER_TIMEOUT_S))
  while kill -0 "$pid" 2>/dev/null; do
    ((SECONDS < deadline)) || die "the temporary server did not stop within ${TEMP_SERVER_TIMEOUT_S}s"
    sleep 0.1
  done
  wait "$pid" || die "the temporary server failed on shutdown (its log is above)"
  say "MariaDB init process done. Ready for start up."
}

if [[ ! -d $DATADIR/mysql ]]; then
  init "$@"
fi

exec "$@"
