#!/usr/bin/env bash
# Forecast serving, tickmesh (release build) against the original stack's
# approach, FastAPI + PyTorch serving the same checkpoint from the same rows
# (scripts/bench/serve_peer.py), in one run on this machine, with wrk on the
# same cores. For n_steps 10 and 100 at concurrency 1, 8 and 64 it prints
# throughput and latency p50/p99 of:
#
#   tickmesh            the default config (concurrent requests on the same
#                       model and data share one computation: [serve] coalesce)
#   tickmesh, no share  coalesce = false: every request computes its own forecast
#   FastAPI             the peer
#
# and the ratios to FastAPI's throughput.
#
#   scripts/bench/serve.sh
#
# Environment: DURATION (seconds per point, 15), STEPS ("10 100"),
# CONCURRENCY ("1 8 64"), TICKMESH_BIN (skip the build), WORK (keep the
# demo's models there instead of a temporary directory).
set -euo pipefail
here="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$here"
. scripts/env.sh
if [ -z "${TICKMESH_BIN:-}" ]; then
  cargo build --release --locked -p tickmesh --bin tickmesh >&2
  TICKMESH_BIN="$CARGO_TARGET_DIR/release/tickmesh"
fi
py="$TORCH_VENV/bin/python"
command -v wrk >/dev/null || {
  say "installing wrk (Debian)"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get install -y -qq wrk >/dev/null
}
# The peer's own packages, pinned (not needed by the tests).
PEER_PKGS=(fastapi==0.165.0 uvicorn==0.55.0)
"$py" - "${PEER_PKGS[@]}" <<'PY' 2>/dev/null || "$py" -m pip install --quiet "${PEER_PKGS[@]}" >&2
import sys
from importlib.metadata import version
sys.exit(0 if all(version(p.split("==")[0]) == p.split("==")[1] for p in sys.argv[1:]) else 1)
PY

DURATION="${DURATION:-15}"
STEPS="${STEPS:-10 100}"
CONCURRENCY="${CONCURRENCY:-1 8 64}"
# MSFT's daily model: the demo's AAPL version loses to naive and is not
# promoted (docs/serving.md, the promotion gate), so nothing serves AAPL.
TICKER=MSFT INTERVAL=1d
if [ -n "${WORK:-}" ]; then work="$WORK"; mkdir -p "$work"; else work="$(mktemp -d)"; fi
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -n "${WORK:-}" ] || rm -rf "$work"
}
trap cleanup EXIT

# The engine alone: one forward pass, native against libtorch, and a
# 100-step forecast, per kind (one thread, no HTTP).
"$TICKMESH_BIN" bench-forecast > "$work/forward.jsonl"

# Models: the demo trains AAPL and MSFT (daily) and two synthetic tickers.
if [ ! -f "$work/demo/tickmesh.db" ]; then
  say "training the demo's models into $work/demo (a few minutes)"
  RUST_LOG=warn "$TICKMESH_BIN" demo --workdir "$work/demo" > "$work/demo.log" 2>&1 \
    || { tail -30 "$work/demo.log"; exit 1; }
fi
ckpt="$(ls -d "$work/demo/store/models/$TICKER/$INTERVAL"/v* | sort -V | tail -n1)"
say "checkpoint: $ckpt"

wait_http() { # url
  for _ in $(seq 600); do
    curl -sf -o /dev/null "$1" && return 0
    sleep 0.1
  done
  echo "no answer from $1" >&2; return 1
}

serve_toml() { # file port coalesce
  cat > "$1" <<TOML
[cluster]
name = "servebench"
backend = "embedded"
[embedded]
data_dir = "$work/demo"
[coordinator]
listen = "127.0.0.1:0"
[serve]
http_listen = "127.0.0.1:$2"
coalesce = $3
[aggregate]
on_ingest = false
[[nodes]]
name = "serve"
roles = ["coordinator", "serve"]
TOML
}

# wrk prints requests/s and the latency distribution; one line of JSON.
measure() { # label url concurrency
  local threads=$(( $3 < 2 ? 1 : 2 ))
  wrk -t"$threads" -c"$3" -d"${DURATION}s" --latency --timeout 30s "$2" > "$work/wrk.txt" 2>&1 || true
  "$py" - "$1" "$3" "$work/wrk.txt" <<'PY'
import json, re, sys
label, conc, text = sys.argv[1], int(sys.argv[2]), open(sys.argv[3]).read()
def ms(s):
    v, u = re.match(r"([\d.]+)(us|ms|s)", s).groups()
    return float(v) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[u]
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
p = {k: ms(v) for k, v in re.findall(r"\s(50|99)%\s+([\d.]+(?:us|ms|s))", text)}
errors = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
sock = re.search(r"Socket errors: (.*)", text)
print(json.dumps({"label": label, "c": conc, "rps": rps, "p50_ms": p.get("50"), "p99_ms": p.get("99"),
                  "non_2xx": int(errors.group(1)) if errors else 0, "socket_errors": sock.group(1) if sock else ""}))
PY
}

results="$work/results.jsonl"; : > "$results"
measure_server() { # label pid port log: every point against the server just started, then stop it
  wait_http "http://127.0.0.1:$3/ml/forecast?ticker=$TICKER&interval=$INTERVAL&n_steps=1"
  # Whoever answered must be that server (not a leftover on the port).
  kill -0 "$2" 2>/dev/null || { echo "$1 exited:" >&2; tail -5 "$4" >&2; exit 1; }
  for n in $STEPS; do
    for c in $CONCURRENCY; do
      measure "$1 n_steps=$n" "http://127.0.0.1:$3/ml/forecast?ticker=$TICKER&interval=$INTERVAL&n_steps=$n" "$c" | tee -a "$results"
    done
  done
  kill "$2"; wait "$2" 2>/dev/null || true
}
run_tickmesh() { # label coalesce
  serve_toml "$work/serve.toml" 18080 "$2"
  RUST_LOG=warn "$TICKMESH_BIN" run --config "$work/serve.toml" --node serve > "$work/tickmesh-$2.log" 2>&1 &
  pids+=("$!")
  measure_server "$1" "$!" 18080 "$work/tickmesh-$2.log"
}
run_tickmesh "tickmesh" true
run_tickmesh "tickmesh, no share" false
"$py" scripts/bench/serve_peer.py --checkpoint "$ckpt" --db "$work/demo/tickmesh.db" --port 18081 > "$work/peer.log" 2>&1 &
pids+=("$!")
measure_server "FastAPI" "$!" 18081 "$work/peer.log"

echo
echo "## forward pass and forecast, one thread ($(date -u +%F))"
"$py" - "$work/forward.jsonl" <<'PY'
import json, sys
print("| kind | native forward | libtorch forward | libtorch / native | 100-step forecast | per step |")
print("|---|---|---|---|---|---|")
for l in open(sys.argv[1]):
    r = json.loads(l)
    print(f"| {r['kind']} | {r['native_forward_us']:.1f} µs | {r['libtorch_forward_us']:.1f} µs | **{r['libtorch_over_native']:.1f}×** "
          f"| {r['forecast_us'] / 1000:.2f} ms | {r['per_step_us']:.1f} µs |")
PY
echo
echo "## $TICKER $INTERVAL, ${DURATION} s per point, wrk on the same $(nproc) cores ($(date -u +%F))"
"$py" - "$results" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
peer = {(r["label"].split("n_steps=")[1], r["c"]): r for r in rows if r["label"].startswith("FastAPI")}
print("| server | n_steps | concurrency | req/s | p50 | p99 | non-2xx | vs FastAPI |")
print("|---|---|---|---|---|---|---|---|")
for r in rows:
    name, n = r["label"].split(" n_steps=")
    base = peer.get((n, r["c"]))
    ratio = f"**{r['rps'] / base['rps']:.1f}×**" if base and not name.startswith("FastAPI") else ""
    print(f"| {name} | {n} | {r['c']} | {r['rps']:,.0f} | {r['p50_ms']:.2f} ms | {r['p99_ms']:.2f} ms | {r['non_2xx']} | {ratio} |")
PY
