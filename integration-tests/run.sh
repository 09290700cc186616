#!/usr/bin/env bash
# The test command (README): builds everything once, starts the real services the tests
# need, and runs every test of the workspace (unit, log, engine, end-to-end).
#
#   bash integration-tests/run.sh [extra cargo test args]
#
# On a fresh Debian machine it installs what is missing (the service scripts do), so CI
# (.ci/run) and a developer run exactly the same thing.
set -euo pipefail
cd "$(dirname "$0")/.."

# Build prerequisites from Debian (cmake and headers for the bundled librdkafka) when absent.
bash integration-tests/scripts/build-deps.sh

# The real services (PostgreSQL, Kafka and MariaDB; installed when absent) start in the background
# while everything compiles.
services_log=$(mktemp)
bash integration-tests/scripts/services.sh start >"$services_log" 2>&1 &
services_pid=$!

# Binaries first: the end-to-end tests start them as processes. Building them in the same
# invocation as the tests' dependencies (--workspace) turns the crash points on.
cargo build --workspace --bins --examples --locked
cargo test --workspace --locked --no-run

if ! wait "$services_pid"; then
  cat "$services_log" >&2
  echo "error: starting the test services failed (see above)" >&2
  exit 1
fi
eval "$(bash integration-tests/scripts/services.sh env)"
cargo test --workspace --locked "$@"
