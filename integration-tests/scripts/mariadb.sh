#!/usr/bin/env bash
# Start/stop a PRIVATE MariaDB server for Pledge's integration tests (XA participant).
#
#   mariadb.sh start    install Debian's mariadb-server if needed, create/start the server;
#                       also restarts a server killed with SIGKILL (InnoDB crash recovery)
#   mariadb.sh stop     clean shutdown (SIGTERM; prepared XA transactions survive)
#   mariadb.sh status   exit 0 if our server is up and answering
#   mariadb.sh env      print exports; use: eval "$(mariadb.sh env)"
#   mariadb.sh sql [DB] run SQL from stdin as the server's admin (unix socket), e.g.
#                         echo 'XA RECOVER' | mariadb.sh sql
#
# Environment:
#   PLEDGE_STATE_DIR      default /tmp/pledge-it  (server lives in $PLEDGE_STATE_DIR/mariadb)
#   PLEDGE_MARIADB_PORT   default 53306           (TCP port on 127.0.0.1 only)
#
# Why a private server rather than the package's own (port 3306, /run/mysqld): our own
# port, socket and data dir, settings that make prepared XA transactions crash-safe, and
# nothing system-wide touched. The package's service is kept from starting (see
# install_mariadb).
#
# Accounts: the tests connect over TCP as pledge/pledge (see `env`). The script itself
# administers the server over its unix socket as the OS user running it (root, or you),
# which mariadb-install-db creates with unix_socket authentication: no admin password.
set -euo pipefail

LOG_TAG=mariadb
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$HERE/lib.sh"

MDB_PORT="${PLEDGE_MARIADB_PORT:-53306}"
MDB_ROOT="$PLEDGE_STATE_DIR/mariadb"
MDB_DATA="$MDB_ROOT/data"
MDB_BINLOG_DIR="$MDB_ROOT/binlog"
MDB_RUN="$MDB_ROOT/run"                  # unix socket and pid file
MDB_SOCKET="$MDB_RUN/mariadbd.sock"
MDB_PID_FILE="$MDB_RUN/mariadbd.pid"
MDB_CNF="$MDB_ROOT/my.cnf"               # rewritten on every start
MDB_LOG="$MDB_ROOT/mariadbd.log"         # the server's error log (log_error)
MDB_OUT="$MDB_ROOT/mariadbd.out"         # its stdout/stderr (normally empty)
MDB_USER=pledge
MDB_PASSWORD=pledge
MDB_DATABASES=(pledge_a pledge_b)
# XA recovery after a crash looks prepared transactions up by server_id (MDEV-27342): it
# must never change for a data dir, so it is fixed here.
MDB_SERVER_ID=53306
# InnoDB crash recovery after kill -9 replays the redo log (benchmarks write a lot of it):
# allow for it, bounded.
READY_TIMEOUT_S=120
STOP_TIMEOUT_S=60

# The OS user the server runs as: mariadbd refuses to run as root unless told to, so as
# root it switches to 'mysql' (the package's user) by itself (user= in my.cnf); as any
# other user it runs as that user.
if [[ $EUID -eq 0 ]]; then OS_USER=mysql; else OS_USER="$(id -un)"; fi
ADMIN_USER="$(id -un)"   # unix_socket account made by mariadb-install-db

url_for() { printf 'mysql://%s:%s@127.0.0.1:%s/%s' "$MDB_USER" "$MDB_PASSWORD" "$MDB_PORT" "$1"; }

find_bin() {
  local name p
  for name in "$@"; do
    for p in "$(command -v "$name" 2>/dev/null || true)" "/usr/sbin/$name" "/usr/bin/$name"; do
      [[ -n $p && -x $p ]] && { printf '%s' "$p"; return 0; }
    done
  done
  return 0
}

find_bins() {
  MARIADBD="$(find_bin mariadbd)"
  INSTALL_DB="$(find_bin mariadb-install-db mysql_install_db)"
  CLIENT="$(find_bin mariadb)"
  ADMIN="$(find_bin mariadb-admin)"
}

as_mdb() {
  if [[ $EUID -eq 0 ]]; then
    runuser -u "$OS_USER" -- "$@"
  else
    "$@"
  fi
}

POLICY_RC=/usr/sbin/policy-rc.d
POLICY_MARK='# written by pledge integration-tests/scripts/mariadb.sh'

remove_our_policy() {
  if [[ -f $POLICY_RC ]] && grep -qF "$POLICY_MARK" "$POLICY_RC"; then rm -f "$POLICY_RC"; fi
}

# The package would start its own server on port 3306 (socket /run/mysqld/mysqld.sock) and
# enable it at boot. We never use it. invoke-rc.d and deb-systemd-invoke ask policy-rc.d
# first, so while the package installs, a policy-rc.d refusing mariadb/mysql keeps it from
# starting; an existing policy-rc.d (Docker images ship one refusing everything) is left
# alone. Whatever the policy did, a system server found running afterwards is stopped and
# disabled.
install_mariadb() {
  log "MariaDB server or client not found: installing Debian's mariadb-server and mariadb-client"
  [[ $EUID -eq 0 ]] || die "need root to install mariadb-server mariadb-client (install them, or run as root)"
  local ours=0
  if [[ ! -e $POLICY_RC ]]; then
    cat >"$POLICY_RC" <<EOF
#!/bin/sh
$POLICY_MARK: keeps the package's own server from starting while it installs.
case "\$1" in mariadb|mysql|mariadb.service|mysql.service) exit 101 ;; esac
exit 0
EOF
    chmod 755 "$POLICY_RC"
    ours=1
    trap remove_our_policy EXIT
  fi
  apt_install mariadb-server mariadb-client
  ((ours)) && remove_our_policy
  stop_system_service
}

stop_system_service() {
  if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null; then
    if systemctl is-enabled --quiet mariadb 2>/dev/null || systemctl is-active --quiet mariadb 2>/dev/null; then
      log "stopping and disabling the package's own mariadb service (port 3306): we run our own"
      systemctl disable --now mariadb >/dev/null 2>&1 || log "warning: could not stop/disable the mariadb service"
    fi
  elif [[ -f /run/mysqld/mysqld.pid ]] && kill -0 "$(cat /run/mysqld/mysqld.pid)" 2>/dev/null; then
    log "stopping the package's own MariaDB server (port 3306): we run our own"
    if ! { command -v service >/dev/null && service mariadb stop >/dev/null 2>&1; }; then
      kill -TERM "$(cat /run/mysqld/mysqld.pid)" 2>/dev/null || true
    fi
  fi
}

ensure_os_user() {
  [[ $EUID -eq 0 ]] || return 0
  if ! id "$OS_USER" >/dev/null 2>&1; then
    log "creating system user '$OS_USER'"
    useradd --system --user-group --home-dir /nonexistent --no-create-home --shell /bin/false "$OS_USER"
  fi
}

# Make the state dir usable by the server's OS user. The parent must be traversable: a
# state dir under /root (mode 700) would not work.
prepare_dirs() {
  [[ -d $PLEDGE_STATE_DIR ]] || install -d -m 755 "$PLEDGE_STATE_DIR"
  mkdir -p "$MDB_ROOT"
  if [[ $EUID -eq 0 ]]; then
    chown "$OS_USER:" "$MDB_ROOT"
    chmod 750 "$MDB_ROOT"
  fi
  as_mdb test -w "$MDB_ROOT" \
    || die "the $OS_USER OS user cannot write $MDB_ROOT (is a parent dir of PLEDGE_STATE_DIR=$PLEDGE_STATE_DIR closed, e.g. under /root?)"
  as_mdb mkdir -p "$MDB_RUN" "$MDB_BINLOG_DIR"
  # A unix socket path is limited to 107 bytes.
  ((${#MDB_SOCKET} < 108)) || die "socket path $MDB_SOCKET is too long for a unix socket: use a shorter PLEDGE_STATE_DIR"
}

write_settings() {
  local user_line=''
  [[ $EUID -eq 0 ]] && user_line="user = $OS_USER"
  as_mdb tee "$MDB_CNF" >/dev/null <<EOF
# Written by integration-tests/scripts/mariadb.sh on each start; edits are lost.
# The server reads only this file (--defaults-file): nothing from /etc/mysql.
[mariadbd]
$user_line
datadir = $MDB_DATA
port = $MDB_PORT
bind_address = 127.0.0.1
socket = $MDB_SOCKET
pid_file = $MDB_PID_FILE
log_error = $MDB_LOG
skip_name_resolve
max_connections = 200
innodb_lock_wait_timeout = 10
character_set_server = utf8mb4
collation_server = utf8mb4_general_ci

# Crash-safe, durable XA: a prepared XA transaction is written to the binary log and the
# InnoDB redo log, both synced before XA PREPARE answers, so it survives kill -9 of the
# server and is listed by XA RECOVER after restart. Never turn these off here: the tests
# measure durability.
log_bin = $MDB_BINLOG_DIR/mariadb-bin
log_bin_index = $MDB_BINLOG_DIR/mariadb-bin.index
binlog_format = ROW
sync_binlog = 1
innodb_flush_log_at_trx_commit = 1
# Fixed: crash recovery of XA transactions matches them by server_id.
server_id = $MDB_SERVER_ID
# Benchmarks write a lot of binlog: keep a day of it, in files of 256 MiB.
max_binlog_size = 256M
binlog_expire_logs_seconds = 86400
EOF
}

# Admin client: our unix socket, as the OS user's unix_socket account; no option files.
sql_admin() { "$CLIENT" --no-defaults --protocol=socket --socket="$MDB_SOCKET" -u "$ADMIN_USER" -N -B "$@"; }

# True once the server answers on our socket (mariadb-admin ping says "alive" even when
# access is denied, which also counts as answering).
mdb_ready() { "$ADMIN" --no-defaults --protocol=socket --socket="$MDB_SOCKET" -u "$ADMIN_USER" --connect-timeout=2 ping >/dev/null 2>&1; }

pid_alive() {
  local pid="$1" state
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  # A killed server whose parent does not reap it stays a zombie: that is dead too.
  state="$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || true)"
  [[ $state != Z ]]
}

# The pid of OUR running server, or empty: the pid file's process, if it is a mariadbd
# whose command line names our my.cnf (a stale pid file after kill -9 or a reboot may name
# an unrelated process).
our_pid() {
  local pid
  pid="$(cat "$MDB_PID_FILE" 2>/dev/null || true)"
  if pid_alive "$pid" && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "--defaults-file=$MDB_CNF"; then
    printf '%s' "$pid"
  fi
  return 0
}

init_datadir() {
  log "mariadb-install-db: $MDB_DATA (admin: '$ADMIN_USER' over the unix socket)"
  # --auth-root-authentication-method=socket: root@localhost (and the OS user) log in over
  # the socket only, no password. --skip-test-db: no 'test' database, no anonymous grants.
  as_mdb "$INSTALL_DB" --defaults-file="$MDB_CNF" --datadir="$MDB_DATA" \
    --auth-root-authentication-method=socket --auth-root-socket-user="$ADMIN_USER" \
    --skip-test-db >"$MDB_ROOT/install-db.log" 2>&1 \
    || { tail -n 20 "$MDB_ROOT/install-db.log" >&2; rm -rf "$MDB_DATA"; die "mariadb-install-db failed (log: $MDB_ROOT/install-db.log)"; }
  as_mdb touch "$MDB_DATA/.pledge-initialized"
}

setup_accounts() {
  local db grants=''
  for db in "${MDB_DATABASES[@]}"; do
    grants+="CREATE DATABASE IF NOT EXISTS $db CHARACTER SET utf8mb4;"
  done
  local host
  for host in 127.0.0.1 localhost; do
    grants+="CREATE USER IF NOT EXISTS '$MDB_USER'@'$host' IDENTIFIED BY '$MDB_PASSWORD';"
    grants+="ALTER USER '$MDB_USER'@'$host' IDENTIFIED BY '$MDB_PASSWORD';"
    for db in "${MDB_DATABASES[@]}"; do
      grants+="GRANT ALL PRIVILEGES ON $db.* TO '$MDB_USER'@'$host';"
    done
    # XA RECOVER needs no privilege in MariaDB 10.11 (tried: an account with USAGE only lists
    # every prepared XA transaction of the server, whoever prepared it, and can even
    # XA COMMIT/ROLLBACK it), unlike MySQL 8's XA_RECOVER_ADMIN. Server variables
    # (SHOW VARIABLES, @@log_bin, ...) are readable by any account. BINLOG MONITOR lets the
    # adapter's start-up check read SHOW BINARY LOGS / binlog status; PROCESS lets it read
    # information_schema.INNODB_TRX and SHOW ENGINE INNODB STATUS when a test diagnoses a lock.
    grants+="GRANT BINLOG MONITOR, PROCESS ON *.* TO '$MDB_USER'@'$host';"
  done
  sql_admin -e "$grants" || die "creating databases and the '$MDB_USER' account failed"
}

check_settings() {
  local got
  got="$(sql_admin -e 'SELECT @@datadir, @@port, @@log_bin, @@sync_binlog, @@innodb_flush_log_at_trx_commit, @@binlog_format, @@server_id')" \
    || die "could not read the server's settings on $MDB_SOCKET"
  local want
  want="$(printf '%s/\t%s\t1\t1\t1\tROW\t%s' "$MDB_DATA" "$MDB_PORT" "$MDB_SERVER_ID")"
  [[ $got == "$want" ]] || die "server settings are not ours: got [$got], want [$want]"
}

# Waits (bounded) until the server answers: returns 0 once it does, 1 if process $1 has
# exited; dies when the bound passes.
wait_ready() {
  local pid="$1" deadline=$((SECONDS + READY_TIMEOUT_S))
  until mdb_ready; do
    pid_alive "$pid" || return 1
    if ((SECONDS >= deadline)); then
      tail -n 30 "$MDB_LOG" >&2 || true
      die "MariaDB not ready on $MDB_SOCKET / 127.0.0.1:$MDB_PORT after ${READY_TIMEOUT_S}s (pid $pid; log: $MDB_LOG)"
    fi
    sleep 0.1
  done
}

cmd_start() {
  local t0 pid
  t0="$(now)"
  find_bins
  if [[ -z $MARIADBD || -z $INSTALL_DB || -z $CLIENT || -z $ADMIN ]]; then
    install_mariadb
    find_bins
    [[ -n $MARIADBD && -n $INSTALL_DB && -n $CLIENT && -n $ADMIN ]] \
      || die "mariadb-server/mariadb-client installed but mariadbd, mariadb-install-db, mariadb or mariadb-admin not found"
  fi
  ensure_os_user

  pid="$(our_pid)"
  if [[ -n $pid ]]; then
    # Already up (idempotent start): make sure it answers and is ours. A server killed
    # moments ago can still look alive; if it turns out dead, start a new one below.
    if wait_ready "$pid"; then
      check_settings
      setup_accounts
      log "already running on 127.0.0.1:$MDB_PORT (pid $pid, data: $MDB_DATA)"
      print_urls
      return 0
    fi
    log "the server found running has exited: starting it again"
  fi

  if port_open "$MDB_PORT"; then
    die "port $MDB_PORT on 127.0.0.1 is in use by something other than our server ($MDB_DATA); set PLEDGE_MARIADB_PORT or stop it"
  fi

  prepare_dirs
  write_settings
  if [[ ! -f $MDB_DATA/.pledge-initialized ]]; then
    # A half-made data dir (install-db died) would be half-usable: start over.
    [[ -e $MDB_DATA ]] && rm -rf "$MDB_DATA"
    init_datadir
  fi
  # After kill -9 the pid file and the socket (and its .lock) stay behind. No server of
  # ours runs (checked above): they are stale.
  if [[ -f $MDB_PID_FILE ]]; then
    log "removing stale pid file (pid $(cat "$MDB_PID_FILE" 2>/dev/null)): last stop was not clean; InnoDB will recover"
    rm -f "$MDB_PID_FILE"
  fi
  rm -f "$MDB_SOCKET" "$MDB_SOCKET.lock"

  log "starting MariaDB ($("$MARIADBD" --version | grep -o '[0-9][0-9.]*-MariaDB[^ ,]*' | head -n 1)) on 127.0.0.1:$MDB_PORT"
  # setsid: its own session, so a Ctrl-C or a test harness killing its process group does
  # not take the server down. Not a process group leader (no job control here), so setsid
  # execs without forking and $! is the server's pid. stdin/out/err never refer to the
  # caller's pipes: a caller reading our output to EOF must not wait for the server.
  # As root, mariadbd switches to $OS_USER itself (user= in my.cnf).
  (exec setsid "$MARIADBD" --defaults-file="$MDB_CNF" </dev/null >>"$MDB_OUT" 2>&1) &
  pid=$!
  wait_ready "$pid" || { tail -n 30 "$MDB_LOG" >&2 || true; die "MariaDB exited during start (log: $MDB_LOG)"; }
  check_settings
  setup_accounts
  log "ready in $(elapsed_since "$t0") s (pid $pid)"
  print_urls
}

print_urls() {
  local db
  for db in "${MDB_DATABASES[@]}"; do
    log "  $(url_for "$db")"
  done
  log "  (socket: $MDB_SOCKET; log: $MDB_LOG)"
}

cmd_stop() {
  local pid deadline
  pid="$(our_pid)"
  if [[ -z $pid ]]; then
    log "not running ($MDB_DATA)"
    return 0
  fi
  # SIGTERM is mariadbd's clean shutdown: sessions are rolled back, prepared XA
  # transactions stay prepared (that is the point) and come back on the next start.
  kill -TERM "$pid"
  deadline=$((SECONDS + STOP_TIMEOUT_S))
  while pid_alive "$pid"; do
    if ((SECONDS >= deadline)); then
      log "no clean shutdown after ${STOP_TIMEOUT_S}s: SIGKILL (InnoDB recovers on the next start)"
      kill -KILL "$pid" 2>/dev/null || true
      break
    fi
    sleep 0.1
  done
  log "stopped"
}

cmd_status() {
  find_bins
  local pid
  pid="$(our_pid)"
  if [[ -n $pid && -n $ADMIN ]] && mdb_ready; then
    log "running on 127.0.0.1:$MDB_PORT (pid $pid, data: $MDB_DATA)"
  else
    log "not running"
    return 1
  fi
}

cmd_env() {
  local start
  start="env PLEDGE_STATE_DIR=$(printf '%q' "$PLEDGE_STATE_DIR") PLEDGE_MARIADB_PORT=$MDB_PORT bash $(printf '%q' "$HERE/mariadb.sh") start"
  printf 'export PLEDGE_MARIADB_PORT=%s\n' "$MDB_PORT"
  printf 'export PLEDGE_MARIADB_URL_A=%s\n' "$(url_for pledge_a)"
  printf 'export PLEDGE_MARIADB_URL_B=%s\n' "$(url_for pledge_b)"
  printf 'export PLEDGE_MARIADB_PID_FILE=%q\n' "$MDB_PID_FILE"
  printf 'export PLEDGE_MARIADB_SOCKET=%q\n' "$MDB_SOCKET"
  printf 'export PLEDGE_MARIADB_START=%q\n' "$start"
}

cmd_sql() {
  find_bins
  [[ -n $CLIENT ]] || die "the mariadb client is not installed (mariadb.sh start installs it)"
  sql_admin ${1:+-D "$1"}
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) cmd_env ;;
  sql) shift; cmd_sql "$@" ;;
  *) echo "usage: $0 start|stop|status|env|sql [DB]" >&2; exit 2 ;;
esac
