#!/usr/bin/env bash
# Installs what tickmesh needs at pinned versions, skipping what is already
# there: Debian packages (PostgreSQL, build tools), a Python venv with
# torch==2.11.0 and safetensors==0.8.0, the tansu 0.6.0 broker and the
# s3s-fs 0.14.1 S3 server.
# Idempotent; says what it did. Installs go to $TICKMESH_CACHE (outside the clone).
#
#   scripts/setup.sh          everything the tests need
#   scripts/setup.sh --demo   only what `tickmesh demo` needs (build tools, torch)
set -euo pipefail
demo_only=0
[ "${1:-}" = "--demo" ] && demo_only=1
here="$(cd "$(dirname "$0")" && pwd)"
. "$here/env.sh"
mkdir -p "$TICKMESH_CACHE/logs"

# --- Debian packages
need_apt=()
[ $demo_only -eq 1 ] || ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || need_apt+=(postgresql)
command -v make >/dev/null || need_apt+=(make)
command -v g++ >/dev/null || need_apt+=(g++)
command -v gcc >/dev/null || need_apt+=(gcc)
command -v perl >/dev/null || need_apt+=(perl)
[ $demo_only -eq 1 ] || command -v openssl >/dev/null || need_apt+=(openssl)  # the TLS test's certificates
[ $demo_only -eq 1 ] || [ -x /usr/bin/chromium ] || need_apt+=(chromium)      # the dashboard test's browser
python3 -m venv --help >/dev/null 2>&1 || need_apt+=(python3-venv)
if [ ${#need_apt[@]} -gt 0 ]; then
  say "installing Debian packages: ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
else
  say "Debian packages: present (postgresql, make, gcc, g++, perl, python3-venv, openssl, chromium)"
fi

# --- torch (libtorch for tch 0.24)
if "$TORCH_VENV/bin/python" -c "import torch,sys; sys.exit(0 if torch.__version__.split('+')[0]=='$TORCH_VERSION' else 1)" 2>/dev/null; then
  say "torch $TORCH_VERSION: present in $TORCH_VENV"
else
  say "installing torch==$TORCH_VERSION into $TORCH_VENV (about 4.6 GB, a few minutes)"
  rm -rf "$TORCH_VENV"
  python3 -m venv "$TORCH_VENV"
  "$TORCH_VENV/bin/pip" install --quiet "torch==$TORCH_VERSION" >"$TICKMESH_CACHE/logs/torch-install.log" 2>&1 \
    || { tail -20 "$TICKMESH_CACHE/logs/torch-install.log"; exit 1; }
fi

# --- safetensors in the torch venv (the PyTorch parity test and the training benchmark's peer)
SAFETENSORS_VERSION=0.8.0
if "$TORCH_VENV/bin/python" -c "import safetensors,sys; sys.exit(0 if safetensors.__version__=='$SAFETENSORS_VERSION' else 1)" 2>/dev/null; then
  say "safetensors $SAFETENSORS_VERSION: present in $TORCH_VENV"
else
  say "installing safetensors==$SAFETENSORS_VERSION into $TORCH_VENV"
  "$TORCH_VENV/bin/pip" install --quiet "safetensors==$SAFETENSORS_VERSION" >"$TICKMESH_CACHE/logs/safetensors-install.log" 2>&1 \
    || { tail -20 "$TICKMESH_CACHE/logs/safetensors-install.log"; exit 1; }
fi

if [ $demo_only -eq 1 ]; then
  say "setup for the demo done (cache: $TICKMESH_CACHE)"
  exit 0
fi

# --- Python used by the tests (a batching Kafka producer, independent
# Parquet readers, TA-Lib for the indicators, exchange-calendars for the NYSE
# calendar, Playwright to drive Debian's Chromium through the dashboard; it
# downloads no browser of its own), in the torch venv
TEST_PY_PKGS=(confluent-kafka==2.16.1 pyarrow==26.0.1 duckdb==2.0.0 pandas==3.1.1 boto3==1.44.5 ta-lib==0.8.2 exchange-calendars==4.13.2 playwright==1.65.3)
if "$TORCH_VENV/bin/python" - "${TEST_PY_PKGS[@]}" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
sys.exit(0 if all(version(p.split("==")[0]) == p.split("==")[1] for p in sys.argv[1:]) else 1)
PY
then
  say "test Python packages: present (${TEST_PY_PKGS[*]})"
else
  say "installing ${TEST_PY_PKGS[*]} into $TORCH_VENV"
  "$TORCH_VENV/bin/pip" install --quiet "${TEST_PY_PKGS[@]}" >"$TICKMESH_CACHE/logs/test-python-install.log" 2>&1 \
    || { tail -20 "$TICKMESH_CACHE/logs/test-python-install.log"; exit 1; }
fi

# --- cargo-installed servers
install_crate() { # name version bin root features...
  local name=$1 version=$2 bin=$3 root=$4; shift 4
  if [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -q "$version"; then
    say "$name $version: present at $bin"
    return
  fi
  say "installing $name $version (cargo install --locked $*; minutes)"
  (unset CARGO_TARGET_DIR; cargo install "$name@$version" --locked "$@" --root "$root") \
    >"$TICKMESH_CACHE/logs/$name-install.log" 2>&1 \
    || { tail -30 "$TICKMESH_CACHE/logs/$name-install.log"; exit 1; }
}
install_crate s3s-fs "$S3S_VERSION" "$S3S_BIN" "$TICKMESH_CACHE/s3s-fs-$S3S_VERSION" --features binary
install_crate tansu "$TANSU_VERSION" "$TANSU_BIN" "$TICKMESH_CACHE/tansu-$TANSU_VERSION" --features dynostore

say "setup done (cache: $TICKMESH_CACHE)"
