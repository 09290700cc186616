#!/usr/bin/env bash
# Entrypoint of the substitute postgres image (deploy/images/postgres), written for this
# project with the official image's interface, in this subset:
#
#   POSTGRES_PASSWORD          the superuser's password; required unless
#                              POSTGRES_HOST_AUTH_METHOD=trust
#   POSTGRES_USER              the superuser (default postgres)
#   POSTGRES_DB                a database created at init (default: $POSTGRES_USER)
#   POSTGRES_INITDB_ARGS       extra initdb arguments, e.g. "--data-checksums"
#   POSTGRES_HOST_AUTH_METHOD  pg_hba method for remote connections (default scram-sha-256)
#   PGDATA                     the cluster (default /var/lib/postgresql/data)
#   /docker-entrypoint-initdb.d/*.sql, *.sql.gz, *.sh
#                              run once, in name order, when the cluster is created
#   command                    `postgres [-c name=value ...]` (or just the flags); anything
#                              else runs as given
#
# As the official image: a cluster is created only when $PGDATA holds none; init runs against
# a temporary server listening on the Unix socket only, so nothing connects over TCP before
# init is done and "database system is ready to accept connections" is logged once by it and
# once by the real server (what wait strategies such as testcontainers' count).
set -Eeuo pipefail

say() { printf '%s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# `docker run postgres:15 -c fsync=off` means `postgres -c fsync=off`.
if [[ ${1:-} == -* ]]; then
  set -- postgres "$@"
fi

if [[ ${1:-} != postgres ]] || [[ " $* " == *" --help "* || " $* " == *" --version "* || " $* " == *" -V "* ]]; then
  exec "$@"
fi

# As root: own the data directory, then run this script again as postgres.
if [[ $(id -u) == 0 ]]; then
  mkdir -p "$PGDATA"
  chown postgres:postgres "$PGDATA"
  chmod 00700 "$PGDATA"
  mkdir -p /var/run/postgresql
  chown postgres:postgres /var/run/postgresql
  chmod 03775 /var/run/postgresql
  exec gosu postgres "${BASH_SOURCE[0]}" "$@"
fi

: "${POSTGRES_USER:=postgres}"
: "${POSTGRES_DB:=$POSTGRES_USER}"
: "${POSTGRES_HOST_AUTH_METHOD:=scram-sha-256}"
export POSTGRES_USER POSTGRES_DB

if [[ ! -s $PGDATA/PG_VERSION ]]; then
  if [[ -z ${POSTGRES_PASSWORD:-} && $POSTGRES_HOST_AUTH_METHOD != trust ]]; then
    die "the database is uninitialized and POSTGRES_PASSWORD is not set: set it (docker run -e \
POSTGRES_PASSWORD=...), or POSTGRES_HOST_AUTH_METHOD=trust to allow every connection without one"
  fi
  say "initializing the cluster in $PGDATA (superuser $POSTGRES_USER)"
  # shellcheck disable=SC2086  # POSTGRES_INITDB_ARGS is a list of arguments
  initdb --username="$POSTGRES_USER" --pwfile=<(printf '%s\n' "${POSTGRES_PASSWORD:-}") \
    ${POSTGRES_INITDB_ARGS:-}
  printf '\nhost all all all %s\n' "$POSTGRES_HOST_AUTH_METHOD" >>"$PGDATA/pg_hba.conf"

  # The temporary server: Unix socket only.
  PGUSER="$POSTGRES_USER" PGPASSWORD="${POSTGRES_PASSWORD:-}" \
    pg_ctl -D "$PGDATA" -o "-c listen_addresses='' -p 5432" -w start
  psql=(psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --no-password --no-psqlrc)
  if [[ $POSTGRES_DB != postgres ]]; then
    "${psql[@]}" --dbname postgres --set db="$POSTGRES_DB" <<<'CREATE DATABASE :"db";'
  fi
  psql+=(--dbname "$POSTGRES_DB")
  shopt -s nullglob
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
      *.sql) say "running $f"; "${psql[@]}" -f "$f" ;;
      *.sql.gz) say "running $f"; gunzip -c "$f" | "${psql[@]}" ;;
      *) say "ignoring $f" ;;
    esac
  done
  shopt -u nullglob
  pg_ctl -D "$PGDATA" -m fast -w stop
  say "PostgreSQL init process complete; ready for start up."
fi

exec "$@"
