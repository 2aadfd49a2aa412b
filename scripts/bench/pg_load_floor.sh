#!/usr/bin/env bash
# PostgreSQL's own time for loading rows of aggregated_data's 1m shape
# (ticker, interval, ts and 33 float8 columns), three ways, with psql's binary
# COPY in two streams and nothing else running (BENCHMARKS.md, aggregation,
# "The 30 s target"):
#
#   1. into one table with its primary key;
#   2. into one table without it, then the key built (a sorted build);
#   3. into two tables created in the loading transactions, COPY … FREEZE,
#      each key built in the same transaction (a table per series).
#
#   scripts/bench/pg_load_floor.sh          2.63M rows (a fifth of the 1m reference)
#   ROWS=1315000 scripts/bench/pg_load_floor.sh   rows per stream
#
# Uses the test server of scripts/services.sh (started if needed).
set -euo pipefail
here="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$here"
. scripts/env.sh
scripts/services.sh up >/dev/null 2>&1 || scripts/services.sh up
rows="${ROWS:-1315000}"
work="$(mktemp -d)"; chmod 755 "$work"
export PGPASSWORD=tickmesh PGOPTIONS="-c client_min_messages=warning"
P=(psql -h 127.0.0.1 -p "$PG_PORT" -U tickmesh -d tickmesh -qAt -v ON_ERROR_STOP=1)
su_psql() { # as the server's superuser (CHECKPOINT, the WAL position)
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- psql -h "$TICKMESH_STATE" -p "$PG_PORT" -U postgres -d tickmesh -qAt "$@"
  else psql -h "$TICKMESH_STATE" -p "$PG_PORT" -U postgres -d tickmesh -qAt "$@"; fi
}
cleanup() {
  "${P[@]}" -c "DROP TABLE IF EXISTS floor_src, floor_pk, floor_heap, floor_new1, floor_new2" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
cols=""
for k in $(seq 0 32); do cols+=", CASE WHEN i < 30 THEN NULL ELSE random() * 100 END AS c$k"; done
"${P[@]}" -c "SET client_min_messages = warning" -c "DROP TABLE IF EXISTS floor_src" \
  -c "CREATE TABLE floor_src AS SELECT 'BA' || lpad(t::text, 2, '0') AS ticker, '1m'::text AS \"interval\",
        timestamptz '2021-01-04 14:30Z' + (i || ' minutes')::interval AS ts $cols
      FROM generate_series(1, 2) t, generate_series(1, $rows) i"
for p in 1 2; do
  "${P[@]}" -c "\\copy (SELECT * FROM floor_src WHERE ticker = 'BA0$p' ORDER BY ts) TO '$work/p$p.bin' WITH (FORMAT binary)"
done
echo "rows: $((2 * rows)), heap: $("${P[@]}" -c "SELECT pg_size_pretty(pg_relation_size('floor_src'))")"
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }
lsn() { su_psql -c "SELECT pg_current_wal_insert_lsn()"; }
wal() { su_psql -c "SELECT pg_size_pretty(pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '$1'))"; }
pk() { echo "ALTER TABLE $1 ADD PRIMARY KEY (ticker, \"interval\", ts)"; }

"${P[@]}" -c "DROP TABLE IF EXISTS floor_pk" -c "CREATE TABLE floor_pk (LIKE floor_src)" -c "$(pk floor_pk)"
su_psql -c "CHECKPOINT" >/dev/null; w=$(lsn); s=$(now)
for p in 1 2; do "${P[@]}" -c "\\copy floor_pk FROM '$work/p$p.bin' WITH (FORMAT binary)" & done; wait
echo "1. one table with its key, 2 streams: $(secs "$s") s, WAL $(wal "$w")"

"${P[@]}" -c "DROP TABLE IF EXISTS floor_heap" -c "CREATE TABLE floor_heap (LIKE floor_src)"
su_psql -c "CHECKPOINT" >/dev/null; w=$(lsn); s=$(now)
for p in 1 2; do "${P[@]}" -c "\\copy floor_heap FROM '$work/p$p.bin' WITH (FORMAT binary)" & done; wait
t=$(secs "$s"); s=$(now)
"${P[@]}" -c "SET maintenance_work_mem = '1GB'" -c "$(pk floor_heap)"
echo "2. one table without a key, 2 streams: $t s, then the key: $(secs "$s") s, WAL $(wal "$w")"

"${P[@]}" -c "DROP TABLE IF EXISTS floor_new1, floor_new2"
su_psql -c "CHECKPOINT" >/dev/null; w=$(lsn); s=$(now)
for p in 1 2; do
  "${P[@]}" -c "BEGIN" -c "CREATE TABLE floor_new$p (LIKE floor_src)" \
    -c "\\copy floor_new$p FROM '$work/p$p.bin' WITH (FORMAT binary, FREEZE)" \
    -c "SET maintenance_work_mem = '512MB'" -c "$(pk "floor_new$p")" -c "COMMIT" &
done; wait
echo "3. a fresh table per stream, FREEZE, key in the same transaction: $(secs "$s") s, WAL $(wal "$w")"
