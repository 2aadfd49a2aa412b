#!/usr/bin/env bash
# Ingest throughput on the reference workload, Kafka → Parquet in the S3
# server, release build: tickmesh's ingest role beside a Python consumer
# built the way the original stack built it (confluent-kafka + pandas +
# pyarrow + boto3, scripts/bench/ingest_peer.py), on the same topic, broker
# and S3 server, in the same run. Prints both, the ratio and peak memory.
#
#   scripts/bench/ingest.sh                      30 tickers × 2021-01-04..2025-06-30 (≈12M bars)
#   TICKERS=4 TO=2021-06-30 scripts/bench/ingest.sh   a quick look
#
# Environment: TICKERS (30), FROM (2021-01-04), TO (2025-06-30), PARTITIONS
# (1: the original's topic), TICKMESH_BIN (skip the build), PEER=0 (tickmesh
# alone). The records go to fresh topics and buckets (prefix bench<time>-);
# tansu keeps its topics in memory until `scripts/services.sh down`, and the
# buckets are removed from the S3 server's folder at the end.
set -euo pipefail
here="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$here"
. scripts/env.sh
if [ -z "${TICKMESH_BIN:-}" ]; then
  cargo build --release --locked -p tickmesh --bin tickmesh >&2
  TICKMESH_BIN="$CARGO_TARGET_DIR/release/tickmesh"
fi
scripts/services.sh up >&2
py="$TICKMESH_CACHE/torch-2.11.0/bin/python"
"$py" -c "import confluent_kafka, pandas, pyarrow, boto3" \
  || { echo "the Python peer's modules are missing: run scripts/setup.sh" >&2; exit 1; }

n="${TICKERS:-30}"
from="${FROM:-2021-01-04}"
to="${TO:-2025-06-30}"
tickers=$(for i in $(seq 1 "$n"); do printf 'BN%02d,' "$i"; done)
tickers="${tickers%,}"
id="bench$(date +%s)"
work="$(mktemp -d)"
cleanup() {
  rm -rf "$work" "$TICKMESH_STATE/s3/$id-"*
}
trap cleanup EXIT
cat > "$work/cluster.toml" <<TOML
[cluster]
name = "$id"
backend = "distributed"
cookie = "$id-bench-cookie-0123456789"
[kafka]
brokers = "127.0.0.1:${KAFKA_PORT}"
topic_prefix = "$id-"
group_id = "$id"
[s3]
endpoint_url = "http://127.0.0.1:${S3_PORT}"
bucket_prefix = "$id-tm-"
[postgres]
port = ${PG_PORT}
${INGEST_TOML:-}
TOML
tm() { RUST_LOG="${RUST_LOG:-warn}" "$TICKMESH_BIN" "$@"; }
tm admin --config "$work/cluster.toml" create-topics --partitions "${PARTITIONS:-1}" >&2
tm admin --config "$work/cluster.toml" create-buckets >&2

echo "producing $n tickers × $from..$to of synthetic 1-minute bars to ${id}-h_alpaca" >&2
out=$(RUST_LOG=info "$TICKMESH_BIN" produce --config "$work/cluster.toml" synthetic --tickers "$tickers" --from "$from" --to "$to" 2> "$work/produce.log")
echo "$out" >&2
records=$(echo "$out" | sed -n 's/^published \([0-9]*\) messages.*/\1/p')
[ -n "$records" ] || { echo "could not read the message count from: $out" >&2; exit 1; }

echo "tickmesh: bench-ingest of $records records" >&2
ours=$(tm bench-ingest --config "$work/cluster.toml" --records "$records")
echo "tickmesh: $ours"
if [ "${PEER:-1}" = 0 ]; then
  exit 0
fi
echo "python peer: confluent-kafka + pandas + pyarrow + boto3" >&2
peer=$("$py" scripts/bench/ingest_peer.py "127.0.0.1:${KAFKA_PORT}" "$id-h_alpaca" "$id-peer" \
  "http://127.0.0.1:${S3_PORT}" tickmesh tickmesh-secret "$id-py-stock-data" "$records")
echo "python:   $peer"
"$py" - "$ours" "$peer" <<'PY'
import json, sys
a, b = json.loads(sys.argv[1]), json.loads(sys.argv[2])
assert a["bars"] == b["bars"], (a["bars"], b["bars"])
mib = lambda x: x / 2**20
print(f"bars: {a['bars']:,} in {a['records']:,} messages")
rss = lambda r: f"peak RSS {mib(r['peak_rss_bytes']):.0f} MiB, {mib(r['start_rss_bytes']):.0f} MiB of it at the start"
print(f"tickmesh {a['bars_per_s']:,.0f} bars/s ({a['seconds']:.1f} s, {rss(a)})")
print(f"python   {b['bars_per_s']:,.0f} bars/s ({b['seconds']:.1f} s, {rss(b)})")
print(f"ratio    {a['bars_per_s'] / b['bars_per_s']:.2f}x")
PY
