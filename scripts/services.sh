#!/usr/bin/env bash
# scripts/services.sh up|down|status
#
# Starts the test services on 127.0.0.1 with all state under $TICKMESH_STATE:
#   PostgreSQL  :15432  (own data directory; role/password tickmesh, database tickmesh)
#   tansu       :19092  (Kafka protocol, memory storage; topics created explicitly)
#   s3s-fs      :19000  (S3 protocol, SigV4 keys tickmesh / tickmesh-secret; buckets created)
# waits until each answers, and stops exactly what it started (by pid).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
. "$here/env.sh"

TOPICS=(h_alpaca h_macrodata h_company live_bars start_model
        h_alpaca.dlq h_macrodata.dlq h_company.dlq live_bars.dlq start_model.dlq)
BUCKETS=(stock-data macro-data company-fundamentals models)
PG_DATA="$TICKMESH_STATE/pg"

pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1; }
as_pg() { # runs a PostgreSQL tool as the postgres user when we are root (it refuses root)
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() { # port name seconds log
  local i
  for ((i = 0; i < $3 * 10; i++)); do
    port_open "$1" && return 0
    sleep 0.1
  done
  say "$2 did not answer on 127.0.0.1:$1 within $3 s; its log ($4):"
  tail -n 30 "$4" >&2 || true
  return 1
}
pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_bg() { # name pidfile log cmd...
  local name=$1 pidfile=$2 log=$3; shift 3
  if pid_alive "$pidfile"; then say "$name: already running (pid $(cat "$pidfile"))"; return; fi
  nohup "$@" >"$log" 2>&1 &
  echo $! >"$pidfile"
}

up_postgres() {
  local bin; bin="$(pg_bin)"
  [ -n "$bin" ] || { say "PostgreSQL is not installed: run scripts/setup.sh"; exit 1; }
  if [ ! -f "$PG_DATA/PG_VERSION" ]; then
    mkdir -p "$PG_DATA"
    [ "$(id -u)" -eq 0 ] && chown postgres "$PG_DATA" "$TICKMESH_STATE"
    as_pg "$bin/initdb" -D "$PG_DATA" -U postgres --auth-local=trust --auth-host=scram-sha-256 >"$TICKMESH_STATE/initdb.log" 2>&1 \
      || { cat "$TICKMESH_STATE/initdb.log"; exit 1; }
  fi
  if as_pg "$bin/pg_ctl" -D "$PG_DATA" status >/dev/null 2>&1; then
    say "PostgreSQL: already running"
  else
    as_pg "$bin/pg_ctl" -D "$PG_DATA" -w -t 60 -l "$TICKMESH_STATE/postgres.log" \
      -o "-p $PG_PORT -k $TICKMESH_STATE -c listen_addresses=127.0.0.1 -c max_connections=200 -c fsync=off" start >/dev/null \
      || { tail -n 30 "$TICKMESH_STATE/postgres.log"; exit 1; }
  fi
  wait_port "$PG_PORT" PostgreSQL 30 "$TICKMESH_STATE/postgres.log"
  as_pg "$bin/psql" -h "$TICKMESH_STATE" -p "$PG_PORT" -U postgres -d postgres -qtA -v ON_ERROR_STOP=1 >/dev/null <<'SQL'
DO $$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'tickmesh') THEN
    CREATE ROLE tickmesh LOGIN CREATEDB PASSWORD 'tickmesh';
  END IF;
END $$;
SELECT 'CREATE DATABASE tickmesh OWNER tickmesh' WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = 'tickmesh')
\gexec
SQL
  say "PostgreSQL: 127.0.0.1:$PG_PORT (database tickmesh, user tickmesh)"
}

up_tansu() {
  [ -x "$TANSU_BIN" ] || { say "tansu is not installed: run scripts/setup.sh"; exit 1; }
  local fresh=0
  pid_alive "$TICKMESH_STATE/tansu.pid" || fresh=1
  start_bg tansu "$TICKMESH_STATE/tansu.pid" "$TICKMESH_STATE/tansu.log" \
    "$TANSU_BIN" broker --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" --storage-engine memory://tansu/
  wait_port "$KAFKA_PORT" tansu 60 "$TICKMESH_STATE/tansu.log"
  if [ $fresh -eq 1 ]; then
    local t
    for t in "${TOPICS[@]}"; do
      "$TANSU_BIN" topic create "$t" --broker "tcp://127.0.0.1:$KAFKA_PORT" --partitions 1 >>"$TICKMESH_STATE/topics.log" 2>&1 \
        || { say "creating topic $t failed:"; tail -n 5 "$TICKMESH_STATE/topics.log"; exit 1; }
    done
  fi
  say "tansu: 127.0.0.1:$KAFKA_PORT (topics: ${TOPICS[*]})"
}

up_s3() {
  [ -x "$S3S_BIN" ] || { say "s3s-fs is not installed: run scripts/setup.sh"; exit 1; }
  local b
  for b in "${BUCKETS[@]}"; do mkdir -p "$TICKMESH_STATE/s3/$b"; done
  start_bg s3s-fs "$TICKMESH_STATE/s3s.pid" "$TICKMESH_STATE/s3s.log" \
    "$S3S_BIN" --host 127.0.0.1 --port "$S3_PORT" --access-key tickmesh --secret-key tickmesh-secret "$TICKMESH_STATE/s3"
  wait_port "$S3_PORT" s3s-fs 30 "$TICKMESH_STATE/s3s.log"
  say "s3s-fs: http://127.0.0.1:$S3_PORT (buckets: ${BUCKETS[*]})"
}

stop_pid() { # name pidfile binary
  local name=$1 pidfile=$2 bin=$3 pid
  if ! [ -f "$pidfile" ]; then return; fi
  pid="$(cat "$pidfile")"
  # Only a process we started: the pid must still run our binary.
  if kill -0 "$pid" 2>/dev/null && [ "$(readlink -f "/proc/$pid/exe" 2>/dev/null)" = "$(readlink -f "$bin")" ]; then
    kill "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    say "$name: stopped (pid $pid)"
  fi
  rm -f "$pidfile"
}

case "${1:-}" in
  up)
    mkdir -p "$TICKMESH_STATE"
    chmod 755 "$TICKMESH_STATE"
    up_postgres
    up_tansu
    up_s3
    ;;
  down)
    stop_pid s3s-fs "$TICKMESH_STATE/s3s.pid" "$S3S_BIN"
    stop_pid tansu "$TICKMESH_STATE/tansu.pid" "$TANSU_BIN"
    if [ -f "$PG_DATA/postmaster.pid" ]; then
      as_pg "$(pg_bin)/pg_ctl" -D "$PG_DATA" -m fast -w stop >/dev/null && say "PostgreSQL: stopped"
    fi
    ;;
  status)
    rc=0
    port_open "$PG_PORT" && say "PostgreSQL: up on $PG_PORT" || { say "PostgreSQL: down"; rc=1; }
    port_open "$KAFKA_PORT" && say "tansu: up on $KAFKA_PORT" || { say "tansu: down"; rc=1; }
    port_open "$S3_PORT" && say "s3s-fs: up on $S3_PORT" || { say "s3s-fs: down"; rc=1; }
    exit $rc
    ;;
  *)
    echo "usage: scripts/services.sh up|down|status" >&2
    exit 2
    ;;
esac
