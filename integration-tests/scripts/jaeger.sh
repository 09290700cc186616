#!/usr/bin/env bash
# Start/stop a private Jaeger (v2: the OpenTelemetry Collector based `jaeger` binary, in-memory
# storage) for the tracing tests: an OTLP receiver for the processes' spans and the query API
# the tests read traces back from.
#
#   jaeger.sh start    build Jaeger from the Go module proxy if not cached, start, wait until ready
#   jaeger.sh stop     SIGTERM, wait (bounded), SIGKILL as a last resort
#   jaeger.sh status   exit 0 if our Jaeger is up and its query API answers
#   jaeger.sh env      print exports; use: eval "$(jaeger.sh env)"
#   jaeger.sh build    only build (and cache) the binary
#
# Environment:
#   PLEDGE_STATE_DIR          default /tmp/pledge-it  (config, log, pid in $PLEDGE_STATE_DIR/jaeger)
#   PLEDGE_CACHE_DIR          default ~/.cache/pledge (the built binary in jaeger-<version>/)
#   PLEDGE_JAEGER_OTLP_PORT   default 54317  (OTLP/gRPC receiver, 127.0.0.1)
#   PLEDGE_JAEGER_OTLP_HTTP_PORT  default 54318  (OTLP/HTTP receiver, 127.0.0.1)
#   PLEDGE_JAEGER_QUERY_PORT  default 56686  (query HTTP API and UI, 127.0.0.1)
#   PLEDGE_JAEGER_QUERY_GRPC_PORT default 56685  (query gRPC API, 127.0.0.1)
#   PLEDGE_JAEGER_HEALTH_PORT default 53133  (health check, 127.0.0.1)
#   GO                        the Go toolchain (default: go on PATH, else /usr/local/go/bin/go)
#
# Jaeger is a Go program: the Go module proxy serves its source, so it is built here (no
# prebuilt download). On a fresh machine that takes minutes (the binary links every storage
# backend): see the timing in the log; later starts reuse the cached binary.
set -euo pipefail

LOG_TAG=jaeger
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# PINNED. v1.75.0 of the module holds Jaeger v2's cmd/jaeger (the v1 module path carries both);
# the newer versions the proxy serves are not approved releases.
JAEGER_MODULE=github.com/jaegertracing/jaeger
JAEGER_VERSION=v1.75.0
# Jaeger v1.75 needs Go 1.24 or newer (its go.mod); Debian's golang-go is older.
MIN_GO_MINOR=24

OTLP_PORT="${PLEDGE_JAEGER_OTLP_PORT:-54317}"
OTLP_HTTP_PORT="${PLEDGE_JAEGER_OTLP_HTTP_PORT:-54318}"
QUERY_PORT="${PLEDGE_JAEGER_QUERY_PORT:-56686}"
QUERY_GRPC_PORT="${PLEDGE_JAEGER_QUERY_GRPC_PORT:-56685}"
HEALTH_PORT="${PLEDGE_JAEGER_HEALTH_PORT:-53133}"

CACHE="$PLEDGE_CACHE_DIR/jaeger-$JAEGER_VERSION"
BIN="$CACHE/bin/jaeger"
STATE="$PLEDGE_STATE_DIR/jaeger"
CONF="$STATE/config.yaml"
PID_FILE="$STATE/jaeger.pid"
LOG_FILE="$STATE/jaeger.log"
READY_TIMEOUT_S=60
STOP_TIMEOUT_S=30
# Traces kept in memory (oldest evicted first); the tests make a few dozen.
MAX_TRACES=100000

QUERY_URL="http://127.0.0.1:$QUERY_PORT"

# ---------------------------------------------------------------- toolchain

find_go() {
  GO_BIN="${GO:-}"
  if [[ -z $GO_BIN ]]; then
    GO_BIN="$(command -v go || true)"
    [[ -n $GO_BIN ]] || GO_BIN=/usr/local/go/bin/go
  fi
  [[ -x $GO_BIN ]] || die "Go not found (set GO=/path/to/go): Jaeger is built from source with Go 1.$MIN_GO_MINOR+"
  local v minor
  v="$("$GO_BIN" env GOVERSION)"  # go1.26.8
  minor="$(sed -E 's/^go1\.([0-9]+).*/\1/' <<<"$v")"
  if ! [[ $minor =~ ^[0-9]+$ ]] || ((minor < MIN_GO_MINOR)); then
    die "$GO_BIN is $v; building Jaeger $JAEGER_VERSION needs Go 1.$MIN_GO_MINOR or newer"
  fi
}

# Builds cmd/jaeger in a scratch module (`go get -tool`, since the module's go.mod has
# replace directives that `go install pkg@version` refuses), into a temp file renamed into
# place when complete, so an interrupted build is never taken for a good binary. The module
# and build caches are the scratch directory's own (1.3 GB and 3 GB), removed with it: only
# the binary (about 120 MB) stays.
build() {
  [[ -x $BIN ]] && return 0
  find_go
  local t0 t1 work
  t0="$(now)"
  mkdir -p "$CACHE/bin"
  work="$(mktemp -d "$CACHE/build.XXXXXX")"
  # GOTOOLCHAIN=local: build with this Go, never fetch another toolchain.
  local go=(env GOTOOLCHAIN=local GOFLAGS="-mod=mod -modcacherw" GOMODCACHE="$work/modcache"
    GOCACHE="$work/gocache" "$GO_BIN")
  log "building Jaeger $JAEGER_VERSION ($JAEGER_MODULE/cmd/jaeger) with $("$GO_BIN" env GOVERSION); a fresh machine takes minutes"
  if ! (cd "$work" && "${go[@]}" mod init pledge-it/jaeger && "${go[@]}" get -tool "$JAEGER_MODULE/cmd/jaeger@$JAEGER_VERSION") \
      >"$work/build.log" 2>&1; then
    build_failed "$work" "fetching Jaeger $JAEGER_VERSION from the Go module proxy failed"
  fi
  t1="$(now)"
  log "fetched the sources in $(elapsed_since "$t0") s; compiling"
  if ! (cd "$work" && "${go[@]}" build -trimpath -o "$work/jaeger" "$JAEGER_MODULE/cmd/jaeger") >>"$work/build.log" 2>&1; then
    build_failed "$work" "building Jaeger $JAEGER_VERSION failed"
  fi
  mv -f "$work/jaeger" "$BIN"
  cp "$work/go.mod" "$CACHE/bin/.go.mod"
  rm -rf "$work"
  log "built $BIN in $(elapsed_since "$t0") s (compile $(elapsed_since "$t1") s)"
}

# Keeps the log of a failed build (its gigabytes of caches go), shows its tail, and dies.
build_failed() {
  local work="$1" what="$2"
  mv -f "$work/build.log" "$CACHE/build-failed.log"
  rm -rf "$work"
  tail -n 30 "$CACHE/build-failed.log" >&2 || true
  die "$what (log: $CACHE/build-failed.log)"
}

# ----------------------------------------------------------------- config

write_config() {
  mkdir -p "$STATE"
  cat >"$CONF" <<EOF
# Written by integration-tests/scripts/jaeger.sh on each start; edits are lost.
# Only what the tests use: OTLP in, memory storage, the query API out. No batch processor: a
# span the receiver accepted is in storage when the export call returns, so a test can tell
# "never sent" from "not stored yet" once the sender has exited.
service:
  extensions: [jaeger_storage, jaeger_query, healthcheckv2]
  pipelines:
    traces:
      receivers: [otlp]
      processors: []
      exporters: [jaeger_storage_exporter]
  telemetry:
    metrics:
      level: none
    logs:
      level: info

extensions:
  jaeger_storage:
    backends:
      memstore:
        memory:
          max_traces: $MAX_TRACES
  jaeger_query:
    storage:
      traces: memstore
    http:
      endpoint: 127.0.0.1:$QUERY_PORT
    grpc:
      endpoint: 127.0.0.1:$QUERY_GRPC_PORT
  healthcheckv2:
    use_v2: true
    http:
      endpoint: 127.0.0.1:$HEALTH_PORT

receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 127.0.0.1:$OTLP_PORT
      http:
        endpoint: 127.0.0.1:$OTLP_HTTP_PORT

exporters:
  jaeger_storage_exporter:
    trace_storage: memstore
EOF
}

# ---------------------------------------------------------------- process

# The pid in $PID_FILE, if that process is alive AND is our Jaeger.
running_pid() {
  local pid
  [[ -f $PID_FILE ]] || return 1
  pid="$(<"$PID_FILE")"
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  [[ -r /proc/$pid/cmdline ]] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "--config=file:$CONF" || return 1
  echo "$pid"
}

# The query API answers (with the list of services): bounded by curl's own timeout.
query_ready() {
  curl -fsS --max-time 2 "$QUERY_URL/api/services" 2>/dev/null | grep -q '"data"'
}

ready() {
  port_open "$OTLP_PORT" && query_ready
}

# Ready = the process lives, the OTLP receiver accepts connections and the query API answers.
wait_ready() {
  local pid="$1" deadline="$2"
  until ready; do
    if ! kill -0 "$pid" 2>/dev/null; then
      rm -f "$PID_FILE"
      tail -n 40 "$LOG_FILE" >&2 2>/dev/null || true
      die "Jaeger exited during start (log: $LOG_FILE)"
    fi
    if ((SECONDS >= deadline)); then
      tail -n 40 "$LOG_FILE" >&2 2>/dev/null || true
      die "Jaeger not ready after ${READY_TIMEOUT_S}s (log: $LOG_FILE); it is still running as pid $pid"
    fi
    sleep 0.2
  done
}

ensure_curl() {
  command -v curl >/dev/null || apt_install curl
}

cmd_start() {
  local t0 pid p
  t0="$(now)"
  ensure_curl
  if pid="$(running_pid)"; then
    if ! ready; then
      log "Jaeger pid $pid is running but not ready yet; waiting"
      wait_ready "$pid" $((SECONDS + READY_TIMEOUT_S))
    fi
    log "already running (pid $pid); query API $QUERY_URL"
    return 0
  fi
  rm -f "$PID_FILE"
  for p in "$OTLP_PORT" "$OTLP_HTTP_PORT" "$QUERY_PORT" "$QUERY_GRPC_PORT" "$HEALTH_PORT"; do
    if port_open "$p"; then
      die "port $p on 127.0.0.1 is in use by something other than our Jaeger (pid file $PID_FILE); set the PLEDGE_JAEGER_*_PORT variables or stop it"
    fi
  done

  build
  write_config
  [[ -f $LOG_FILE ]] && mv -f "$LOG_FILE" "$LOG_FILE.prev"

  log "starting Jaeger $JAEGER_VERSION: OTLP gRPC 127.0.0.1:$OTLP_PORT, query $QUERY_URL"
  local deadline=$((SECONDS + READY_TIMEOUT_S))
  # setsid + nohup: Jaeger must outlive this script and its caller's process group. The inner
  # bash writes its own pid and then execs, so the pid file names Jaeger itself.
  # shellcheck disable=SC2016  # $$ and $1 are for the inner bash
  setsid nohup bash -c 'echo $$ >"$1"; shift; exec "$@"' pledge-jaeger "$PID_FILE" \
    "$BIN" "--config=file:$CONF" >"$LOG_FILE" 2>&1 </dev/null &
  until [[ -s $PID_FILE ]]; do
    ((SECONDS < deadline)) || die "Jaeger launch did not write $PID_FILE"
    sleep 0.05
  done
  pid="$(<"$PID_FILE")"
  wait_ready "$pid" "$deadline"
  log "ready in $(elapsed_since "$t0") s (pid $pid; log $LOG_FILE)"
}

cmd_stop() {
  local pid
  if ! pid="$(running_pid)"; then
    log "not running"
    rm -f "$PID_FILE"
    return 0
  fi
  stop_pid "$pid" Jaeger "$STOP_TIMEOUT_S"
  rm -f "$PID_FILE"
  log "stopped"
}

cmd_status() {
  local pid
  if pid="$(running_pid)" && ready; then
    log "running (pid $pid); OTLP gRPC 127.0.0.1:$OTLP_PORT, query $QUERY_URL"
  else
    log "not running"
    return 1
  fi
}

cmd_env() {
  printf 'export PLEDGE_OTLP_ENDPOINT=%s\n' "http://127.0.0.1:$OTLP_PORT"
  printf 'export PLEDGE_JAEGER_QUERY=%s\n' "$QUERY_URL"
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) cmd_env ;;
  build) build ;;
  *) echo "usage: $0 start|stop|status|env|build" >&2; exit 2 ;;
esac
