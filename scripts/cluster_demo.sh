#!/usr/bin/env bash
# A multi-process cluster on one machine, on the embedded backends (file
# spool, a local object directory, SQLite): a coordinator node (with ingest
# and aggregation), two trainer nodes and a predictor node, talking over the
# ractor_cluster mesh. Synthetic 1-minute bars go through ingest and
# aggregation; the coordinator places the jobs (GPU nodes first); the
# predictor serves the new champions. Prints the nodes, the jobs, each
# checkpoint's device and a forecast.
#
#   scripts/cluster_demo.sh                 both trainers on the CPU
#   GPU=1 scripts/cluster_demo.sh           trainer `gpu-1` on cuda:0 (gpus = 1, 4 jobs at once)
#
# Environment: TICKMESH_BIN (skip the build), TICKERS (8 synthetic tickers),
# WORKDIR (a temporary directory), EPOCHS (10).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"
if [ -z "${TICKMESH_BIN:-}" ]; then
  . scripts/env.sh
  cargo build --locked -p tickmesh --bin tickmesh >&2
  TICKMESH_BIN="$CARGO_TARGET_DIR/debug/tickmesh"
fi
tm="$TICKMESH_BIN"
work="${WORKDIR:-$(mktemp -d)}"
mkdir -p "$work"
tickers="${TICKERS:-SYNA,SYNB,SYNC,SYND,SYNE,SYNF,SYNG,SYNH}"
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
if [ "${GPU:-0}" = 1 ]; then
  trainer1='name = "gpu-1"
roles = ["train"]
device = "cuda"
gpus = 1
jobs = 4'
  t1=gpu-1
else
  trainer1='name = "cpu-2"
roles = ["train"]
device = "cpu"
jobs = 1'
  t1=cpu-2
fi
http=$(port)
cat > "$work/cluster.toml" <<EOF
[cluster]
name = "cluster-demo"
backend = "embedded"
cookie = "cluster-demo-cookie-$(date +%s%N)"

[embedded]
data_dir = "$work/data"

[coordinator]
listen = "127.0.0.1:$(port)"
heartbeat_secs = 1
lease_secs = 5

[serve]
http_listen = "127.0.0.1:$http"

[aggregate]
intervals = ["15m"]   # the coordinator node aggregates on its own once the ingest settles

[train]
epochs = ${EPOCHS:-10}
device = "cpu"

[[nodes]]
name = "coord"
roles = ["coordinator", "ingest", "aggregate"]
cluster_port = $(port)

[[nodes]]
$trainer1
cluster_port = $(port)

[[nodes]]
name = "cpu-1"
roles = ["train"]
device = "cpu"
jobs = 1
cluster_port = $(port)

[[nodes]]
name = "pred"
roles = ["serve"]
cluster_port = $(port)
EOF
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
for n in coord "$t1" cpu-1 pred; do
  RUST_LOG="${RUST_LOG:-info}" "$tm" run --node "$n" --config "$work/cluster.toml" 2> "$work/$n.log" &
  pids+=($!)
done
echo "cluster: coord, $t1, cpu-1, pred (logs in $work)"
"$tm" produce synthetic --tickers "$tickers" --from 2024-03-04 --to 2024-03-15 --config "$work/cluster.toml"
n=$(echo "$tickers" | tr ',' '\n' | wc -l)
for _ in $(seq 1 600); do
  got=$(find "$work/data/store/stock-data" -name '*.parquet' 2>/dev/null | sed 's|.*/stock-data/||; s|/.*||' | sort -u | wc -l)
  [ "$got" -ge "$n" ] && break
  sleep 0.2
done
sleep 1
# The aggregate role runs on its own after the ingest; this explicit run
# (a replay if it already did) makes the demo independent of the timing.
"$tm" aggregate --tickers "$tickers" --interval 15m --config "$work/cluster.toml"
start=$(date +%s)
# True while there is no job yet, or one is neither done nor failed.
pending() {
  "$tm" admin jobs --config "$work/cluster.toml" 2>/dev/null |
    awk '/ attempts /{n++; if ($4 != "done" && $4 != "failed") p++} END{exit (n > 0 && p == 0)}'
}
while pending; do
  if [ $(( $(date +%s) - start )) -gt 600 ]; then echo "jobs not finished in 600 s" >&2; exit 1; fi
  sleep 1
done
echo "all jobs finished in $(( $(date +%s) - start )) s"
"$tm" admin nodes --config "$work/cluster.toml"
"$tm" admin jobs --config "$work/cluster.toml"
for meta in "$work"/data/store/models/*/15m/v*/meta.json; do
  python3 -c 'import json,sys; m=json.load(open(sys.argv[1])); print(m["ticker"], "v%s" % m["version"], m["kind"], "trained on", m["device"])' "$meta"
done
# Every version with its status: champion, or rejected by the promotion
# gate (it did not beat naive and the champion on its test window).
"$tm" admin models --all --config "$work/cluster.toml"
sleep 2
# A forecast of each champion the predictor serves.
served=$(curl -sf "http://127.0.0.1:$http/ml/models" |
  python3 -c 'import json,sys; print(" ".join(m["ticker"] for m in json.load(sys.stdin)["models"] if m["state"] == "serving"))')
[ -n "$served" ] || echo "no version beat the naive forecast: nothing serves (tickmesh admin models --all says why)"
for t in $served; do
  curl -sf "http://127.0.0.1:$http/ml/forecast?ticker=$t&interval=15m&n_steps=4"; echo
done
