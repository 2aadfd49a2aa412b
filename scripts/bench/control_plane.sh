#!/usr/bin/env bash
# The control plane's placement and failover, release build: a coordinator
# (a real job table; Admin.Train over gRPC on loopback) and simulated
# trainer nodes whose ports register and heartbeat with the coordinator's
# port as TrainerPool does, in the same process, but never train.
#
#   scripts/bench/control_plane.sh               1,000 jobs, 10 nodes, 20 kills, SQLite
#   PG=1 scripts/bench/control_plane.sh          the job table in PostgreSQL (scripts/services.sh up)
#
# Environment: JOBS (1000), NODES (10), KILLS (20), LEASE (3 s), HEARTBEAT
# (1 s), BACKOFF (coordinator.retry_backoff_ms, 0), TICKMESH_BIN (skip the build).
#
# There is no peer to compare with: the original stack trained tickers one
# after another in one process and had no scheduler, no leases and no
# failover. The figures stand alone.
set -euo pipefail
here="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$here"
. scripts/env.sh
if [ -z "${TICKMESH_BIN:-}" ]; then
  cargo build --release --locked -p tickmesh --bin tickmesh >&2
  TICKMESH_BIN="$CARGO_TARGET_DIR/release/tickmesh"
fi
args=(--jobs "${JOBS:-1000}" --nodes "${NODES:-10}" --kills "${KILLS:-20}"
  --lease-secs "${LEASE:-3}" --heartbeat-secs "${HEARTBEAT:-1}" --retry-backoff-ms "${BACKOFF:-0}")
if [ "${PG:-0}" = 1 ]; then
  args+=(--postgres-config cluster.toml)
  export TICKMESH_COOKIE="${TICKMESH_COOKIE:-bench-cookie}"
fi
RUST_LOG="${RUST_LOG:-warn}" "$TICKMESH_BIN" bench-control-plane "${args[@]}"
