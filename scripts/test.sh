#!/usr/bin/env bash
# The one test command: setup, services up, fmt, clippy, the whole workspace
# test suite, services down. Fails loudly when anything is missing.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here/.."
. scripts/env.sh

start=$(date +%s)
scripts/setup.sh
. scripts/env.sh   # again: the torch venv may be new
scripts/services.sh up
trap 'scripts/services.sh down' EXIT

say "cargo fmt --check"
cargo fmt --all --check
say "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings
say "cargo test (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
cargo test --workspace --locked --no-fail-fast
say "all green in $(( $(date +%s) - start )) s"
