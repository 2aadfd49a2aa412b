# Sourced by the other scripts (and by you: `. scripts/env.sh`): where the
# pinned tools live and how cargo and libtorch find them. Everything installed
# lives in $TICKMESH_CACHE, outside the clone, so fresh clones reuse it.

export TICKMESH_CACHE="${TICKMESH_CACHE:-$HOME/.cache/tickmesh}"
export TICKMESH_STATE="${TICKMESH_STATE:-/tmp/tickmesh-services}"

TORCH_VERSION=2.11.0
TANSU_VERSION=0.6.0
S3S_VERSION=0.14.1

TORCH_VENV="$TICKMESH_CACHE/torch-$TORCH_VERSION"
TANSU_BIN="$TICKMESH_CACHE/tansu-$TANSU_VERSION/bin/tansu"
S3S_BIN="$TICKMESH_CACHE/s3s-fs-$S3S_VERSION/bin/s3s-fs"

# Test service ports (not the usual ones, so a developer's own servers are left alone).
PG_PORT="${TICKMESH_PG_PORT:-15432}"
KAFKA_PORT="${TICKMESH_KAFKA_PORT:-19092}"
S3_PORT="${TICKMESH_S3_PORT:-19000}"

# Build output outside the clone, reused between runs.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$TICKMESH_CACHE/target}"
# tch (torch-sys) asks the venv's python where libtorch is; the binary needs its lib/ at run time.
export PATH="$TORCH_VENV/bin:$PATH"
export LIBTORCH_USE_PYTORCH=1
_torch_lib="$TORCH_VENV/lib/python3.11/site-packages/torch/lib"
if [ -d "$TORCH_VENV/lib" ]; then
  _torch_lib="$(ls -d "$TORCH_VENV"/lib/python3*/site-packages/torch/lib 2>/dev/null | head -n1)"
fi
export LD_LIBRARY_PATH="$_torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
unset _torch_lib

export TICKMESH_TEST_KAFKA="127.0.0.1:$KAFKA_PORT"
export TICKMESH_TEST_S3="http://127.0.0.1:$S3_PORT"
export TICKMESH_TEST_PG_PORT="$PG_PORT"

say() { printf '[tickmesh] %s\n' "$*" >&2; }

# Test binaries embed the clone's path (env!("CARGO_MANIFEST_DIR") finds
# scripts/ and data/ with it), and cargo does not rebuild them when the same
# CARGO_TARGET_DIR serves a clone elsewhere. When the last build came from
# another path, the workspace's own crates are cleaned (not the dependencies).
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_stamp="$CARGO_TARGET_DIR/.tickmesh-source"
if command -v cargo >/dev/null && [ -f "$_stamp" ] && [ "$(cat "$_stamp")" != "$_root" ]; then
  say "the build cache was built from $(cat "$_stamp"), this clone is $_root: rebuilding the workspace crates"
  _pkgs="$(cd "$_root" && cargo metadata --no-deps --format-version 1 --offline 2>/dev/null \
    | python3 -c 'import json,sys; print(" ".join("-p " + p["name"] for p in json.load(sys.stdin)["packages"]))')"
  if [ -n "$_pkgs" ]; then
    # shellcheck disable=SC2086
    (cd "$_root" && cargo clean $_pkgs >&2) || say "cargo clean failed; stale test paths may remain"
  fi
fi
if [ -d "$CARGO_TARGET_DIR" ] || mkdir -p "$CARGO_TARGET_DIR" 2>/dev/null; then
  printf '%s\n' "$_root" >"$_stamp"
fi
unset _root _stamp _pkgs
