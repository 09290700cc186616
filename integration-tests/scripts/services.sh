#!/usr/bin/env bash
# Start/stop every real service the integration tests need (PostgreSQL, Kafka,
# MariaDB and Jaeger, the trace collector), as set up by postgres.sh, kafka.sh,
# mariadb.sh and jaeger.sh beside this file.
#
#   services.sh start    start all IN PARALLEL (saves wall time); fails if any fails
#   services.sh stop     stop all
#   services.sh status   exit 0 only if all are up
#   services.sh env      print exports for all; use: eval "$(services.sh env)"
#
# The environment variables of postgres.sh, kafka.sh, mariadb.sh and jaeger.sh apply
# (PLEDGE_STATE_DIR, PLEDGE_CACHE_DIR, PLEDGE_PG_PORT, PLEDGE_KAFKA_PORT,
# PLEDGE_MARIADB_PORT, ...).
set -euo pipefail

LOG_TAG=services
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$HERE/lib.sh"

SERVICES=(postgres kafka mariadb jaeger)

# Run "<service>.sh <cmd>" for every service at once and wait for all of
# them. Each one's output is already tagged [postgres] / [kafka] / [mariadb] by lib.sh's
# log(), and goes to stderr, so the interleaving stays readable.
run_all_parallel() {
  local cmd="$1" svc failed=() t0
  local -A pids=()
  t0="$(now)"
  for svc in "${SERVICES[@]}"; do
    "$HERE/$svc.sh" "$cmd" &
    pids[$svc]=$!
  done
  for svc in "${SERVICES[@]}"; do
    # `wait PID` returns that child's exit status; set -e must not fire here.
    if ! wait "${pids[$svc]}"; then
      failed+=("$svc")
    fi
  done
  if ((${#failed[@]})); then
    die "$cmd failed for: ${failed[*]} (see the messages above)"
  fi
  log "$cmd: all services done in $(elapsed_since "$t0") s"
}

case "${1:-}" in
  start) run_all_parallel start ;;
  stop) run_all_parallel stop ;;
  status)
    rc=0
    for svc in "${SERVICES[@]}"; do "$HERE/$svc.sh" status || rc=1; done
    exit "$rc"
    ;;
  env)
    for svc in "${SERVICES[@]}"; do "$HERE/$svc.sh" env; done
    ;;
  *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
