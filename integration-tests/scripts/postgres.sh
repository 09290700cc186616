#!/usr/bin/env bash
# Start/stop a PRIVATE PostgreSQL cluster for Pledge's integration tests.
#
#   postgres.sh start    install Debian's postgresql if needed, create/start the cluster
#   postgres.sh stop     fast shutdown (rolls back open sessions; prepared xacts survive)
#   postgres.sh status   exit 0 if our cluster is up and answering
#   postgres.sh env      print exports; use: eval "$(postgres.sh env)"
#
# Environment:
#   PLEDGE_STATE_DIR   default /tmp/pledge-it   (cluster lives in $PLEDGE_STATE_DIR/postgres)
#   PLEDGE_PG_PORT     default 55432            (TCP port on 127.0.0.1 only)
#
# Why a private cluster rather than the package's own "main" cluster: we need
# max_prepared_transactions > 0 (restart required), our own port, trust auth
# and fsync on, without touching anything system-wide.
set -euo pipefail

LOG_TAG=postgres
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PG_PORT="${PLEDGE_PG_PORT:-55432}"
PG_ROOT="$PLEDGE_STATE_DIR/postgres"
PG_DATA="$PG_ROOT/data"
PG_RUN="$PG_ROOT/run"          # unix socket directory
PG_LOG="$PG_ROOT/postgres.log"
PG_USER=pledge                  # bootstrap superuser, created by initdb -U
PG_DATABASES=(pledge_a pledge_b)
# Crash recovery after an unclean stop replays the WAL since the last checkpoint (benchmarks
# write a lot of it): allow for it, bounded.
READY_TIMEOUT_S=120
# The coordinator and the tests keep many branches prepared at once.
MIN_PREPARED_XACTS=64

url_for() { printf 'postgres://%s@127.0.0.1:%s/%s' "$PG_USER" "$PG_PORT" "$1"; }

# Newest installed server version's bin dir, or empty.
find_pg_bin() {
  local p
  p="$(compgen -G '/usr/lib/postgresql/*/bin/postgres' | sort -V | tail -n 1 || true)"
  [[ -n $p ]] && dirname "$p"
  return 0
}

install_postgres() {
  log "PostgreSQL server binaries not found: installing Debian's postgresql package"
  # Stop the package from creating (and auto-starting) its own 'main' cluster
  # on port 5432: we never use it. postgresql-common reads this drop-in dir.
  if [[ $EUID -eq 0 ]]; then
    mkdir -p /etc/postgresql-common/createcluster.d
    printf '# written by pledge integration-tests/scripts/postgres.sh\ncreate_main_cluster = false\n' \
      >/etc/postgresql-common/createcluster.d/pledge-no-main-cluster.conf
  fi
  apt_install postgresql
}

# PostgreSQL refuses to run as root. As root we run server-side commands as
# the 'postgres' OS user; as any other user we run them as that user.
as_pg() {
  if [[ $EUID -eq 0 ]]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

ensure_os_user() {
  [[ $EUID -eq 0 ]] || return 0
  if ! id postgres >/dev/null 2>&1; then
    log "creating system user 'postgres'"
    useradd --system --user-group --home-dir /var/lib/postgresql --no-create-home \
      --shell /bin/bash postgres
  fi
}

# Make the state dir usable by the server's OS user. The parent must be
# traversable: a state dir under /root (mode 700) would not work.
prepare_dirs() {
  # Created world-traversable whatever root's umask, so 'postgres' can reach
  # its folder inside it.
  [[ -d $PLEDGE_STATE_DIR ]] || install -d -m 755 "$PLEDGE_STATE_DIR"
  mkdir -p "$PG_ROOT"
  if [[ $EUID -eq 0 ]]; then
    chown postgres: "$PG_ROOT"
    chmod 700 "$PG_ROOT"
  fi
  as_pg test -w "$PG_ROOT" \
    || die "the postgres OS user cannot write $PG_ROOT (is a parent dir of PLEDGE_STATE_DIR=$PLEDGE_STATE_DIR closed, e.g. under /root?)"
  as_pg mkdir -p "$PG_RUN"
}

psql_admin() {
  # TCP on loopback with trust auth; -X ignores any ~/.psqlrc.
  "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U "$PG_USER" -d postgres "$@"
}

pg_ready() { "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" -U "$PG_USER" -d postgres; }

# True if the postmaster of OUR data dir is running (pg_ctl reads postmaster.pid
# and checks the process, so a stale pid file after a reboot reads as stopped).
our_cluster_running() {
  [[ -f $PG_DATA/PG_VERSION ]] && as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" status >/dev/null 2>&1
}

init_cluster() {
  log "initdb: $PG_DATA (superuser '$PG_USER', trust auth)"
  # --auth=trust: loopback-only test cluster, password-less by design.
  # --no-locale: byte-order collation, identical on every machine.
  as_pg "$PG_BIN/initdb" -D "$PG_DATA" -U "$PG_USER" --auth=trust -E UTF8 --no-locale >"$PG_ROOT/initdb.log" 2>&1 \
    || { tail -n 20 "$PG_ROOT/initdb.log" >&2; die "initdb failed (log: $PG_ROOT/initdb.log)"; }
  # Our settings live in pledge.conf, rewritten on every start so a changed
  # PLEDGE_PG_PORT or state dir takes effect; postgresql.conf just includes it.
  printf "\n# Pledge integration tests: settings rewritten by postgres.sh on each start\ninclude_if_exists = 'pledge.conf'\n" \
    | as_pg tee -a "$PG_DATA/postgresql.conf" >/dev/null
}

# A CA and a server certificate for 127.0.0.1/localhost, made once: the server offers TLS
# (clients choose: sslmode=verify-full with sslrootcert=$PG_CA_PUBLIC checks it), plaintext
# stays allowed. The CA's certificate is copied where any test process can read it.
PG_TLS="$PG_ROOT/tls"
PG_CA_PUBLIC="$PLEDGE_STATE_DIR/postgres-ca.pem"

make_tls() {
  if ! as_pg test -f "$PG_TLS/server.key"; then
    log "making a test CA and server certificate in $PG_TLS"
    as_pg mkdir -p "$PG_TLS"
    as_pg openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=Pledge test PostgreSQL CA" \
      -keyout "$PG_TLS/ca.key" -out "$PG_TLS/ca.pem" >/dev/null 2>&1 || die "openssl: making the CA failed"
    as_pg openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
      -keyout "$PG_TLS/server.key" -out "$PG_TLS/server.csr" >/dev/null 2>&1 || die "openssl: making the key failed"
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n' | as_pg tee "$PG_TLS/ext.cnf" >/dev/null
    as_pg openssl x509 -req -in "$PG_TLS/server.csr" -CA "$PG_TLS/ca.pem" -CAkey "$PG_TLS/ca.key" -CAcreateserial \
      -days 3650 -extfile "$PG_TLS/ext.cnf" -out "$PG_TLS/server.pem" >/dev/null 2>&1 \
      || die "openssl: signing the server certificate failed"
    as_pg chmod 600 "$PG_TLS/server.key"
  fi
  as_pg cat "$PG_TLS/ca.pem" >"$PG_CA_PUBLIC"
  chmod 644 "$PG_CA_PUBLIC"
}

write_settings() {
  make_tls
  as_pg tee "$PG_DATA/pledge.conf" >/dev/null <<EOF
# Written by integration-tests/scripts/postgres.sh on each start; edits are lost.
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$PG_RUN'
# 2PC: PREPARE TRANSACTION needs slots (default 0 disables it; restart needed).
# Phase 2 runs after a client's answer, so prepared branches can outnumber the
# clients: the PostgreSQL benchmark at 32 clients (2 branches each) peaked above 100.
max_prepared_transactions = 256
max_connections = 200
# Real durability: the tests measure it, so never turn these off here.
fsync = on
synchronous_commit = on
full_page_writes = on
# TLS offered (see make_tls); clients that do not ask for it are served plaintext.
ssl = on
ssl_cert_file = '$PG_TLS/server.pem'
ssl_key_file = '$PG_TLS/server.key'
# Log to stderr, which pg_ctl -l sends to $PG_LOG.
logging_collector = off
log_line_prefix = '%m [%p] %q%u@%d '
EOF
}

create_databases() {
  local db exists
  for db in "${PG_DATABASES[@]}"; do
    exists="$(psql_admin -tAc "SELECT 1 FROM pg_database WHERE datname = '$db'")"
    if [[ $exists != 1 ]]; then
      log "creating database $db"
      psql_admin -c "CREATE DATABASE $db OWNER $PG_USER"
    fi
  done
}

check_settings() {
  local mpx
  mpx="$(psql_admin -tAc 'SHOW max_prepared_transactions')"
  [[ $mpx =~ ^[0-9]+$ ]] || die "could not read max_prepared_transactions (got '$mpx')"
  ((mpx >= MIN_PREPARED_XACTS)) \
    || die "max_prepared_transactions = $mpx on port $PG_PORT; need >= $MIN_PREPARED_XACTS (is another server on that port?)"
  local dd
  dd="$(psql_admin -tAc 'SHOW data_directory')"
  [[ $dd == "$PG_DATA" ]] || die "server on port $PG_PORT uses data dir $dd, not ours ($PG_DATA)"
}

cmd_start() {
  local t0
  t0="$(now)"
  PG_BIN="$(find_pg_bin)"
  if [[ -z $PG_BIN ]]; then
    install_postgres
    PG_BIN="$(find_pg_bin)"
    [[ -n $PG_BIN ]] || die "postgresql installed but no /usr/lib/postgresql/*/bin/postgres found"
  fi
  ensure_os_user

  if our_cluster_running; then
    # Already up: just make sure it answers and is ours (idempotent start). A postmaster
    # killed moments ago can still look alive (not yet reaped); if it turns out dead,
    # start a new one below.
    if (pg_ready || wait_ready) && [[ "$(psql_admin -tAc 'SHOW ssl')" != on ]]; then
      log "running without TLS (started by an older version of this script): restarting it"
      cmd_stop
    elif pg_ready || wait_ready; then
      check_settings
      create_databases
      make_tls
      log "already running on 127.0.0.1:$PG_PORT (data: $PG_DATA)"
      print_urls
      return 0
    else
      log "the server found running has exited: starting it again"
    fi
  fi

  # Something else on our port would make the start fail in a confusing way.
  if port_open "$PG_PORT"; then
    die "port $PG_PORT on 127.0.0.1 is in use by something other than our cluster ($PG_DATA); set PLEDGE_PG_PORT or stop it"
  fi

  prepare_dirs
  if [[ ! -f $PG_DATA/PG_VERSION ]]; then
    # A half-made data dir (initdb died) would make initdb refuse: clear it.
    [[ -e $PG_DATA ]] && rm -rf "$PG_DATA"
    init_cluster
  fi
  write_settings
  # A server killed without shutdown (kill -9, machine stop) leaves its pid file behind.
  # pg_ctl status just said no such process runs, so the file is stale: remove it, or
  # wait_ready could read the dead pid before the new postmaster rewrites the file and
  # report a start that is in fact succeeding (crash recovery first) as failed.
  if [[ -f $PG_DATA/postmaster.pid ]]; then
    log "removing stale postmaster.pid (pid $(head -n 1 "$PG_DATA/postmaster.pid")): last stop was not clean"
    as_pg rm -f "$PG_DATA/postmaster.pid"
  fi

  log "starting PostgreSQL ($("$PG_BIN/postgres" --version | awk '{print $3}')) on 127.0.0.1:$PG_PORT"
  # -W: don't let pg_ctl wait; we poll pg_isready ourselves with a bound, and
  # notice at once if the server died.
  as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -W start >/dev/null
  wait_ready || { tail -n 30 "$PG_LOG" >&2 || true; die "PostgreSQL exited during start (log: $PG_LOG)"; }
  check_settings
  create_databases
  log "ready in $(elapsed_since "$t0") s"
  print_urls
}

# Waits (bounded) until the server answers: returns 0 once it does, 1 if its postmaster
# has exited; dies when the bound passes.
wait_ready() {
  local t0=$SECONDS deadline=$((SECONDS + READY_TIMEOUT_S)) pid
  until pg_ready; do
    if ((SECONDS >= deadline)); then
      tail -n 30 "$PG_LOG" >&2 || true
      die "PostgreSQL not ready on 127.0.0.1:$PG_PORT after ${READY_TIMEOUT_S}s (log: $PG_LOG)"
    fi
    # Fail fast instead of waiting out the bound when the server has died:
    # the postmaster writes its pid file within moments of starting.
    pid="$(head -n 1 "$PG_DATA/postmaster.pid" 2>/dev/null || true)"
    if [[ -n $pid ]]; then
      kill -0 "$pid" 2>/dev/null || return 1
    elif ((SECONDS - t0 > 5)); then
      tail -n 30 "$PG_LOG" >&2 || true
      die "PostgreSQL did not start: no postmaster.pid after 5 s (log: $PG_LOG)"
    fi
    sleep 0.2
  done
}

print_urls() {
  local db
  for db in "${PG_DATABASES[@]}"; do
    log "  $(url_for "$db")"
  done
  log "  (unix socket dir: $PG_RUN; log: $PG_LOG)"
}

cmd_stop() {
  PG_BIN="$(find_pg_bin)"
  [[ -n $PG_BIN ]] || { log "PostgreSQL not installed: nothing to stop"; return 0; }
  if ! our_cluster_running; then
    log "not running ($PG_DATA)"
    return 0
  fi
  # -m fast: roll back sessions and shut down cleanly; prepared transactions
  # are durable and come back on the next start (that is the point of 2PC).
  as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w -t 30 stop >/dev/null \
    || die "pg_ctl stop failed (log: $PG_LOG)"
  log "stopped"
}

cmd_status() {
  PG_BIN="$(find_pg_bin)"
  if [[ -n $PG_BIN ]] && our_cluster_running && pg_ready; then
    log "running on 127.0.0.1:$PG_PORT (data: $PG_DATA)"
  else
    log "not running"
    return 1
  fi
}

cmd_env() {
  printf 'export PLEDGE_PG_PORT=%s\n' "$PG_PORT"
  printf 'export PLEDGE_PG_URL_A=%s\n' "$(url_for pledge_a)"
  printf 'export PLEDGE_PG_URL_B=%s\n' "$(url_for pledge_b)"
  printf 'export PLEDGE_PG_CA=%s\n' "$PG_CA_PUBLIC"
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) cmd_env ;;
  *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
