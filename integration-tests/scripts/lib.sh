# shellcheck shell=bash
# Shared helpers for the service scripts (postgres.sh, kafka.sh, services.sh).
# Sourced, never executed: it only defines functions and defaults.

# State (data dirs, logs, pid files) is per run and disposable; the cache
# (downloaded jars) is reused between runs on the same machine.
PLEDGE_STATE_DIR="${PLEDGE_STATE_DIR:-/tmp/pledge-it}"
PLEDGE_CACHE_DIR="${PLEDGE_CACHE_DIR:-${HOME:-/root}/.cache/pledge}"

# Each script sets LOG_TAG before sourcing, so interleaved output from
# services.sh (which runs them all in parallel) stays readable.
log() { printf '[%s] %s\n' "${LOG_TAG:-pledge}" "$*" >&2; }
die() { printf '[%s] ERROR: %s\n' "${LOG_TAG:-pledge}" "$*" >&2; exit 1; }

# Seconds since the epoch with sub-second precision, for timing reports.
now() { date +%s.%N; }
elapsed_since() { awk -v s="$1" -v e="$(now)" 'BEGIN { printf "%.1f", e - s }'; }

# True if something accepts TCP connections on 127.0.0.1:$1. Uses bash's
# /dev/tcp so it needs no extra package; `timeout` bounds a hung connect.
# stop_pid PID WHAT TIMEOUT_S: SIGTERM, wait (bounded) for the process to go, SIGKILL as a
# last resort.
stop_pid() {
  local pid=$1 what=$2 timeout_s=$3
  kill -TERM "$pid" 2>/dev/null || return 0
  local deadline=$((SECONDS + timeout_s))
  while kill -0 "$pid" 2>/dev/null; do
    if ((SECONDS >= deadline)); then
      log "$what pid $pid still alive after ${timeout_s}s: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      return 0
    fi
    sleep 0.2
  done
}

port_open() {
  timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}

# Install Debian packages non-interactively.
# - A lock serialises our own callers: services.sh starts postgres.sh,
#   kafka.sh and mariadb.sh in parallel, and they may need apt on a fresh machine.
# - DPkg::Lock::Timeout makes apt wait for any *other* dpkg user instead of
#   failing at once.
# - `apt-get update` runs only when the package lists are absent, or when the
#   first install attempt fails (stale lists on an old image).
apt_install() {
  [[ $EUID -eq 0 ]] || die "need root to install Debian packages: $*  (install them, or run as root)"
  command -v apt-get >/dev/null || die "apt-get not found: this script expects Debian; install $* by hand"
  local lock=/tmp/pledge-apt.lock
  (
    flock -w 600 9 || die "timed out waiting for $lock"
    export DEBIAN_FRONTEND=noninteractive
    local opts=(-y -q --no-install-recommends -o DPkg::Lock::Timeout=300)
    if ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
      log "apt package lists missing: running apt-get update"
      apt-get update -q >&2 || die "apt-get update failed"
    fi
    if ! apt-get install "${opts[@]}" "$@" >&2; then
      log "apt-get install $* failed; refreshing package lists and retrying once"
      apt-get update -q >&2 || die "apt-get update failed"
      apt-get install "${opts[@]}" "$@" >&2 || die "apt-get install $* failed"
    fi
  ) 9>"$lock"
}
