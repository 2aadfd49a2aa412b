#!/usr/bin/env bash
# Fused training against one model at a time: TICKERS tickers of synthetic
# 5-minute bars (DAYS calendar days each, 6 months by default), the same
# model kind and hyperparameters (hidden 32, seq_len 30, batch 64, Adam
# 1e-3, clip 1.0, 4 features), trained three ways in one run:
#   fused     tickmesh, every ticker in one group (tickmesh_model::fused)
#   solo      tickmesh, one model at a time (fit::fit, what a lone job runs)
#   pytorch   PyTorch eager, one model at a time (scripts/bench/fused_peer.py)
# on the same windows, with the ratios printed. tickmesh also prints the
# largest weight difference between its fused and lone models (among those
# that kept the same epoch's weights) and how many kept another epoch's.
#
#   scripts/bench/fused.sh                                    CPU
#   DEVICE=cuda TICKMESH_BIN=... PYTHON=... scripts/bench/fused.sh   (a GPU machine)
#
# Environment: TICKERS (30), DAYS (182), INTERVAL (5m), EPOCHS (2), KIND
# (lstm_attention), GROUP (0: one group), THREADS (nproc), DEVICE (cpu),
# WAYS (fused,solo), TICKMESH_BIN (skip the build), PYTHON.
set -euo pipefail
here="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$here"
. scripts/env.sh
if [ -z "${TICKMESH_BIN:-}" ]; then
  cargo build --release --locked -p tickmesh --bin tickmesh >&2
  TICKMESH_BIN="$CARGO_TARGET_DIR/release/tickmesh"
fi
PYTHON="${PYTHON:-python}"
TICKERS="${TICKERS:-30}"; DAYS="${DAYS:-182}"; INTERVAL="${INTERVAL:-5m}"; EPOCHS="${EPOCHS:-2}"
KIND="${KIND:-lstm_attention}"; GROUP="${GROUP:-0}"; THREADS="${THREADS:-$(nproc)}"; DEVICE="${DEVICE:-cpu}"
WAYS="${WAYS:-fused,solo}"
work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT

"$TICKMESH_BIN" bench-fused --kind "$KIND" --tickers "$TICKERS" --days "$DAYS" --interval "$INTERVAL" \
  --epochs "$EPOCHS" --group "$GROUP" --threads "$THREADS" --device "$DEVICE" --ways "$WAYS" \
  --windows-out "$work/windows.safetensors" >"$work/ours.jsonl"
"$PYTHON" scripts/bench/fused_peer.py --windows "$work/windows.safetensors" --kind "$KIND" \
  --epochs "$EPOCHS" --threads "$THREADS" --device "$DEVICE" >"$work/peer.jsonl"
"$PYTHON" - "$work/ours.jsonl" "$work/peer.jsonl" <<'PY'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1])]
ways = {j["way"]: j for j in lines if "way" in j}
cmp = next((j for j in lines if "max_weight_diff_fused_vs_solo" in j), None)
peer = json.loads(open(sys.argv[2]).read())
any_way = next(iter(ways.values()))
print(f"{any_way['kind']}, {any_way['tickers']} tickers of {any_way['interval']} bars, {any_way['train_samples']} training windows,"
      f" {any_way['epochs']} epochs, batch {any_way['batch_size']}, {any_way['device']}, {any_way['threads']} threads, torch {peer['torch']}")
print(f"{'way':<34}{'seconds':>9}{'samples/s':>12}")
rows = [(f"tickmesh fused (group {w['group']})" if k == "fused" else "tickmesh one at a time", w) for k, w in ways.items()]
rows.append(("PyTorch eager one at a time", peer))
for name, w in rows:
    print(f"{name:<34}{w['seconds']:>9.1f}{w['samples_per_sec']:>12.0f}")
sps = {k: w["samples_per_sec"] for k, w in ways.items()}
if "fused" in sps and "solo" in sps:
    print(f"fused / tickmesh one at a time: {sps['fused'] / sps['solo']:.2f}x")
if "fused" in sps:
    print(f"fused / PyTorch one at a time:  {sps['fused'] / peer['samples_per_sec']:.2f}x")
if "solo" in sps:
    print(f"tickmesh / PyTorch, one at a time: {sps['solo'] / peer['samples_per_sec']:.2f}x")
if cmp is not None:
    print(f"largest weight difference, fused against one at a time: {cmp['max_weight_diff_fused_vs_solo']:.2e}"
          f" ({cmp['best_epoch_differs']} of {any_way['tickers']} kept another epoch's weights: a near tie of validation losses)")
PY
