#!/usr/bin/env bash
# The main job: installs what the demo needs (build tools, torch 2.11.0 in a
# venv under $TICKMESH_CACHE), builds tickmesh and runs `tickmesh demo`: the
# whole pipeline in one process on the embedded defaults, ending in printed
# forecasts and data/demo/forecast.png. Extra arguments go to `tickmesh demo`
# (e.g. --serve to keep the forecast API up afterwards).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here/.."
. scripts/env.sh
scripts/setup.sh --demo
. scripts/env.sh
say "building tickmesh (first build: about 10-15 minutes on 2 cores)"
cargo build -p tickmesh --locked
exec "$CARGO_TARGET_DIR/debug/tickmesh" demo "$@"
