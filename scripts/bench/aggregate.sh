#!/usr/bin/env bash
# Aggregation benchmark, release build, tickmesh beside its peers in the same run
# on the same input (docs/aggregation.md, BENCHMARKS.md):
#
# 1. compute: read a ticker's 1-minute Parquet objects from a local store, keep
#    the regular session, resample, compute the indicators, as-of join 4 macro
#    series and 8 fundamentals metrics; tickmesh (`tickmesh bench-aggregate`)
#    against Polars (`scripts/bench/aggregate_peer.py compute`), at 1m and 5m,
#    at three sizes of 30 tickers (1.45M, 4.14M, 13.16M bars) to show how the
#    cost grows. At the smallest size both write their rows and `check`
#    compares them (1e-9 relative, same NULLs).
# 2. end to end: Parquet in the S3 server → rows committed in PostgreSQL,
#    `tickmesh aggregate` on the whole 13.16M-bar workload (wall time and
#    peak RSS from /usr/bin/time), beside PostgreSQL alone loading the same
#    committed rows (psql's binary COPY, two streams, into an empty table of
#    the same shape: the database's own floor here), and on a slice beside
#    the original stack's approach (boto3 + pandas + `DataFrame.to_sql`,
#    `aggregate_peer.py e2e`).
#
#   scripts/bench/aggregate.sh                  everything (about 15 minutes here)
#   SIZES=2021-06-30 scripts/bench/aggregate.sh one size, a quick look
#
# Environment: TICKERS (30), FROM (2021-01-04), SIZES (the last days of the
# three sizes), INTERVALS (1m 5m), SLICE (tickers of the pandas slice, 2),
# COMPUTE=0 (skip part 1), E2E=0 (skip part 2), TICKMESH_BIN (skip the build).
set -euo pipefail
here="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$here"
. scripts/env.sh
if [ -z "${TICKMESH_BIN:-}" ]; then
  cargo build --release --locked -p tickmesh --bin tickmesh >&2
  TICKMESH_BIN="$CARGO_TARGET_DIR/release/tickmesh"
fi
py="$TICKMESH_CACHE/torch-2.11.0/bin/python"
"$py" -c "import pandas, pyarrow, boto3, exchange_calendars" \
  || { echo "the Python peers' modules are missing: run scripts/setup.sh" >&2; exit 1; }
# The peers' own packages, pinned (not needed by the tests).
PEER_PKGS=(polars==2.1.0 sqlalchemy==2.1.9 psycopg==3.3.9 psycopg-binary==3.3.9)
"$py" - "${PEER_PKGS[@]}" <<'PY' 2>/dev/null || "$py" -m pip install --quiet "${PEER_PKGS[@]}" >&2
import sys
from importlib.metadata import version
sys.exit(0 if all(version(p.split("==")[0]) == p.split("==")[1] for p in sys.argv[1:]) else 1)
PY

n="${TICKERS:-30}"
from="${FROM:-2021-01-04}"
sizes="${SIZES:-2021-06-30 2022-05-31 2025-06-30}"
intervals="${INTERVALS:-1m 5m}"
macro="CPI=110,REALGDP=120,TBILRATE=92,UNEMP=100"
tickers=$(for i in $(seq 1 "$n"); do printf 'BA%02d,' "$i"; done)
tickers="${tickers%,}"
id="aggbench$(date +%s)"
work="$(mktemp -d)"
cleanup() {
  rm -rf "$work" "$TICKMESH_STATE/s3/$id-"*
}
trap cleanup EXIT
tm() { RUST_LOG="${RUST_LOG:-warn}" "$TICKMESH_BIN" "$@"; }
field() { "$py" -c "import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$1" "$2"; }

if [ "${COMPUTE:-1}" = 1 ]; then
echo "## compute: $n tickers from $from, tickmesh vs Polars $("$py" -c 'import polars; print(polars.__version__)') ($(nproc) cores)"
first=1
for to in $sizes; do
  store="$work/store-$to"
  gen=$(tm bench-aggregate --store "$store" --generate "$from..$to" --tickers "$tickers")
  bars=$(field "$gen" generated_bars)
  for interval in $intervals; do
    ours=$(tm bench-aggregate --store "$store" --tickers "$tickers" --interval "$interval" --macro "$macro")
    peer=$("$py" scripts/bench/aggregate_peer.py compute --store "$store" --tickers "$tickers" \
      --interval "$interval" --macro "$macro" --fund-lag 90)
    echo "tickmesh $interval: $ours"
    echo "polars   $interval: $peer"
    "$py" - "$bars" "$interval" "$ours" "$peer" <<'PY'
import json, sys
bars, interval = int(sys.argv[1]), sys.argv[2]
a, b = json.loads(sys.argv[3]), json.loads(sys.argv[4])
assert a["rows_out"] == b["rows_out"], (a["rows_out"], b["rows_out"])
print(f"| {bars/1e6:.2f}M | {interval} | {a['rows_out']:,} | {a['total_s']:.2f} s | {b['total_s']:.2f} s "
      f"| **{b['total_s']/a['total_s']:.2f}×** | {a['peak_rss_mb']} MiB ({a['start_rss_mb']} at start) | {b['peak_rss_mb']:.0f} MiB |")
PY
    if [ "$first" = 1 ]; then
      # Untimed: both write their rows, and they must agree.
      tm bench-aggregate --store "$store" --tickers "$tickers" --interval "$interval" --macro "$macro" \
        --out "$work/ours-$interval" > /dev/null
      "$py" scripts/bench/aggregate_peer.py compute --store "$store" --tickers "$tickers" \
        --interval "$interval" --macro "$macro" --fund-lag 90 --out "$work/peer-$interval" > /dev/null
      "$py" scripts/bench/aggregate_peer.py check --ours "$work/ours-$interval" --peer "$work/peer-$interval"
    fi
  done
  rm -rf "$store"
  first=0
done
fi

if [ "${E2E:-1}" = 0 ]; then
  exit 0
fi
last="${sizes##* }"
scripts/services.sh up >&2
cat > "$work/cluster.toml" <<TOML
[cluster]
name = "$id"
backend = "distributed"
cookie = "$id-bench-cookie-0123456789"
[kafka]
brokers = "127.0.0.1:${KAFKA_PORT}"
topic_prefix = "$id-"
[s3]
endpoint_url = "http://127.0.0.1:${S3_PORT}"
bucket_prefix = "$id-"
[postgres]
port = ${PG_PORT}
[joins]
macro = { CPI = 110, REALGDP = 120, TBILRATE = 92, UNEMP = 100 }
TOML
tm admin --config "$work/cluster.toml" create-topics --partitions 1 >&2
tm admin --config "$work/cluster.toml" create-buckets >&2
echo
echo "## end to end: Parquet in S3 → PostgreSQL, $n tickers $from..$last"
gen=$(tm bench-aggregate --config "$work/cluster.toml" --generate "$from..$last" --tickers "$tickers")
echo "generated: $gen"
psql_() { PGPASSWORD=tickmesh psql -h 127.0.0.1 -p "$PG_PORT" -U tickmesh -d tickmesh -qAt "$@"; }
timed() { # label, command...: wall seconds and peak RSS
  local label="$1"; shift
  /usr/bin/time -f "%e %M" -o "$work/time" "$@" > /dev/null
  read -r wall kb < "$work/time"
  echo "$label: ${wall} s, peak RSS $((kb / 1024)) MiB"
}
all_tickers="'$(echo "$tickers" | sed "s/,/','/g")'"
for interval in $intervals; do
  psql_ -c "DELETE FROM aggregated_data WHERE ticker IN ($all_tickers) AND \"interval\" = '$interval'"
  psql_ -c "VACUUM aggregated_data"   # a first load into a table without dead rows
  timed "tickmesh aggregate $interval, first load" env RUST_LOG=warn,sqlx=error "$TICKMESH_BIN" aggregate --config "$work/cluster.toml" --tickers "$tickers" --interval "$interval"
  echo "  rows committed: $(psql_ -c "SELECT count(*) FROM aggregated_data WHERE ticker IN ($all_tickers) AND \"interval\" = '$interval'")"
  # The database's own floor: the same committed rows, already computed,
  # loaded by psql's binary COPY in two streams (one a core) into an empty
  # table of the same shape and primary key. No S3, no compute: what
  # PostgreSQL alone needs on this machine for these rows.
  half=$(( (n + 1) / 2 ))
  part1="'$(echo "$tickers" | cut -d, -f"1-$half" | sed "s/,/','/g")'"
  part2="'$(echo "$tickers" | cut -d, -f"$((half + 1))-" | sed "s/,/','/g")'"
  for p in 1 2; do
    eval "part=\$part$p"
    psql_ -c "\\copy (SELECT * FROM aggregated_data WHERE ticker IN ($part) AND \"interval\" = '$interval' ORDER BY ticker, ts) TO '$work/floor$p.bin' WITH (FORMAT binary)"
  done
  psql_ -c "SET client_min_messages = warning" -c "DROP TABLE IF EXISTS ${id}_floor" -c "CREATE TABLE ${id}_floor (LIKE aggregated_data INCLUDING ALL)"
  start=$(date +%s.%N)
  for p in 1 2; do
    psql_ -c "\\copy ${id}_floor FROM '$work/floor$p.bin' WITH (FORMAT binary)" > /dev/null &
  done
  wait
  floor_s=$("$py" -c "import sys, time; print(f'{time.time() - float(sys.argv[1]):.2f}')" "$start")
  psql_ -c "DROP TABLE ${id}_floor"
  rm -f "$work"/floor*.bin
  read -r ours_s _ < "$work/time"
  echo "  PostgreSQL alone, the same rows by psql COPY (2 streams): ${floor_s} s; tickmesh end to end is $("$py" -c "import sys; print(f'{float(sys.argv[1]) / float(sys.argv[2]):.2f}')" "$ours_s" "$floor_s")× that"
  timed "tickmesh aggregate $interval, replay (nothing changes)" env RUST_LOG=warn,sqlx=error "$TICKMESH_BIN" aggregate --config "$work/cluster.toml" --tickers "$tickers" --interval "$interval"
done

slice=$(echo "$tickers" | cut -d, -f"1-${SLICE:-2}")
slice_sql="'$(echo "$slice" | sed "s/,/','/g")'"
echo
echo "## the original stack's approach on a slice: $slice at 5m"
psql_ -c "DELETE FROM aggregated_data WHERE ticker IN ($slice_sql) AND \"interval\" = '5m'"
timed "tickmesh aggregate (slice)" env RUST_LOG=warn,sqlx=error "$TICKMESH_BIN" aggregate --config "$work/cluster.toml" --tickers "$slice" --interval 5m
read -r ours_s _ < "$work/time"
peer=$("$py" scripts/bench/aggregate_peer.py e2e --s3-endpoint "http://127.0.0.1:${S3_PORT}" \
  --bucket-prefix "$id-" --access-key tickmesh --secret-key tickmesh-secret \
  --pg-dsn "postgresql+psycopg://tickmesh:tickmesh@127.0.0.1:${PG_PORT}/tickmesh" \
  --tickers "$slice" --interval 5m --table "${id}_pandas")
echo "pandas + to_sql (slice): $peer"
psql_ -c "DROP TABLE IF EXISTS ${id}_pandas"
"$py" - "$ours_s" "$peer" <<'PY'
import json, sys
ours, b = float(sys.argv[1]), json.loads(sys.argv[2])
print(f"slice: tickmesh {ours:.2f} s, pandas + to_sql {b['total_s']:.2f} s: **{b['total_s']/ours:.1f}×**")
PY
