#!/usr/bin/env bash
# Training throughput, tickmesh (release build) against the same models in
# PyTorch (Python, scripts/bench/train_peer.py), on the same windows with the
# same hyperparameters (hidden 32, seq_len 30, batch 64, Adam 1e-3, clip 1.0,
# 4 features), in one run, with the ratio printed.
#
#   scripts/bench/train.sh                    CPU, every kind
#   DEVICE=cuda TICKMESH_BIN=... PYTHON=... scripts/bench/train.sh    (a GPU machine)
#
# Environment: DAYS (synthetic trading days of 1-minute bars, default 20),
# EPOCHS (3), THREADS (intra-op threads on both sides, default nproc),
# KINDS (lstm_attention,gru,cnn_lstm), DEVICE (cpu), TICKMESH_BIN (skip the build).
set -euo pipefail
here="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$here"
. scripts/env.sh   # libtorch on LD_LIBRARY_PATH, the torch venv's python on PATH
if [ -z "${TICKMESH_BIN:-}" ]; then
  cargo build --release --locked -p tickmesh --bin tickmesh >&2
  TICKMESH_BIN="$CARGO_TARGET_DIR/release/tickmesh"
fi
PYTHON="${PYTHON:-python}"
DAYS="${DAYS:-20}"; EPOCHS="${EPOCHS:-3}"; THREADS="${THREADS:-$(nproc)}"
KINDS="${KINDS:-lstm_attention,gru,cnn_lstm}"; DEVICE="${DEVICE:-cpu}"
work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT

"$TICKMESH_BIN" bench-train --kinds "$KINDS" --days "$DAYS" --epochs "$EPOCHS" \
  --threads "$THREADS" --device "$DEVICE" --windows-out "$work/windows.safetensors" >"$work/ours.jsonl"
for kind in ${KINDS//,/ }; do
  "$PYTHON" scripts/bench/train_peer.py --windows "$work/windows.safetensors" --kind "$kind" \
    --epochs "$EPOCHS" --threads "$THREADS" --device "$DEVICE" >>"$work/peer.jsonl"
done
"$PYTHON" - "$work/ours.jsonl" "$work/peer.jsonl" <<'PY'
import json, sys
ours = {j["kind"]: j for j in map(json.loads, open(sys.argv[1]))}
peer = {j["kind"]: j for j in map(json.loads, open(sys.argv[2]))}
print(f"{'kind':<16}{'device':<8}{'threads':>8}{'windows':>9}{'epochs':>7}{'tickmesh/s':>13}{'pytorch/s':>12}{'ratio':>8}")
missing = sorted(set(ours) ^ set(peer))
if missing:
    sys.exit(f"bench: no result for {missing} on one side")
for k, o in ours.items():
    p = peer[k]
    print(f"{k:<16}{o['device']:<8}{o['threads']:>8}{o['train_samples']:>9}{o['epochs']:>7}"
          f"{o['samples_per_sec']:>13.0f}{p['samples_per_sec']:>12.0f}{o['samples_per_sec']/p['samples_per_sec']:>7.2f}x")
torch_version = next(iter(peer.values()))["torch"] if peer else "?"
print(f"(ratio = tickmesh samples/s / PyTorch samples/s, both timing the epochs with their validation passes;"
      f" the peer also runs one untimed warm-up step; torch {torch_version})")
PY
