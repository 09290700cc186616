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

# Binaries first: the end-to-end tests start them as processes. Building them in the same
# invocation as the tests' dependencies (--workspace) turns the crash points on.
cargo build --workspace --bins --locked
cargo test --workspace --locked "$@"
