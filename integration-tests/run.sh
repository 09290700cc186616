#!/usr/bin/env bash
# The test command (README): builds everything once, starts the real services the tests
# need, and runs every test of the workspace (unit, log, engine, end-to-end, the Helm chart's,
# the container images and compose file's), then the PostgreSQL and Kafka suites once more
# on testcontainers.
#
#   bash integration-tests/run.sh [extra cargo test args]
#
# On a fresh Debian machine it installs what is missing (the service scripts do), so CI
# (.ci/run) and a developer run exactly the same thing.
set -euo pipefail
cd "$(dirname "$0")/.."

# Build prerequisites from Debian (cmake and headers for the bundled librdkafka) when absent.
bash integration-tests/scripts/build-deps.sh

# The real services (PostgreSQL, Kafka, MariaDB and Jaeger; installed when absent), helm (for
# the chart's checks) and the Docker engine with the base images deploy/ names (for the compose
# and testcontainers runs) are made ready in the background while everything compiles.
services_log=$(mktemp)
bash integration-tests/scripts/services.sh start >"$services_log" 2>&1 &
services_pid=$!
helm_log=$(mktemp)
bash integration-tests/scripts/helm.sh install >"$helm_log" 2>&1 &
helm_pid=$!
docker_log=$(mktemp)
bash integration-tests/scripts/docker.sh start >"$docker_log" 2>&1 &
docker_pid=$!

# Waits for a background preparation; on failure shows its log and stops.
ready() {
  local pid=$1 log=$2 what=$3
  if ! wait "$pid"; then
    cat "$log" >&2
    echo "error: $what failed (see above)" >&2
    exit 1
  fi
}
# Containers the testcontainers run leaves behind if it is killed.
remove_test_containers() {
  if bash integration-tests/scripts/docker.sh status 2>/dev/null; then
    docker ps -aq --filter label=dev.pledge.test | xargs -r docker rm -f -v >/dev/null
  fi
}
trap remove_test_containers EXIT

# Binaries first: the end-to-end tests start them as processes. Building them in the same
# invocation as the tests' dependencies (--workspace) turns the crash points on.
cargo build --workspace --bins --examples --locked
cargo test --workspace --locked --no-run

ready "$services_pid" "$services_log" "starting the test services"
ready "$helm_pid" "$helm_log" "installing helm"
ready "$docker_pid" "$docker_log" "starting the Docker engine"
eval "$(bash integration-tests/scripts/services.sh env)"
eval "$(bash integration-tests/scripts/helm.sh env)"
eval "$(bash integration-tests/scripts/docker.sh env)"
bash integration-tests/scripts/helm.sh check
cargo test --workspace --locked "$@"

# The PostgreSQL, Kafka and MariaDB suites once more, against containers from testcontainers-rs
# (integration-tests/src/containers.rs) instead of the local services; the one test that kills
# mariadbd itself needs the local server (it ran above). Only for a whole run: extra arguments
# select tests of the run above.
if (($# == 0)); then
  PLEDGE_TEST_SERVICES=testcontainers cargo test -p pledge-integration-tests --locked \
    --test postgres --test postgres_library --test kafka --test mysql \
    -- --skip a_prepared_branch_survives_mariadb_killed_and_is_committed_after_the_coordinator_restarts
fi
