#!/usr/bin/env bash
# Seconds from one `POST /api/generate` to its last picture, on a `microdit serve` started for it:
#   tools/bench_serve.sh BIN CKPT [N] [serve options, e.g. --precision fp32]
# N pictures (default 8), Heun 30 steps, guidance 4, seed 1; the server takes a free port and is
# stopped with Ctrl-C (SIGINT) afterwards. Needs curl and python3.
set -euo pipefail
BIN=$1 CKPT=$2 N=${3:-8}
shift $(( $# < 3 ? $# : 3 ))
work=$(mktemp -d)  # the server's log, and an empty --runs folder for its dashboard
log=$work/serve.log
"$BIN" serve --ckpt "$CKPT" --runs "$work" --port 0 "$@" > "$log" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT
port=""
for _ in $(seq 600); do
  port=$(sed -n 's#^serving on http://[^:]*:\([0-9]*\)/.*#\1#p' "$log")
  [ -n "$port" ] && break
  kill -0 "$pid" 2>/dev/null || { cat "$log"; exit 1; }
  sleep 0.1
done
[ -n "$port" ] || { echo "serve did not start"; cat "$log"; exit 1; }
json() { python3 -c "import sys, json; print(json.load(sys.stdin)['$1'])"; }
t0=$(date +%s.%N)
id=$(curl -s -X POST -H 'Content-Type: application/json' \
  -d "{\"prompt\":\"red heart\",\"n\":$N,\"steps\":30,\"cfg\":4,\"seed\":1}" "http://127.0.0.1:$port/api/generate" | json id)
while [ "$(curl -s "http://127.0.0.1:$port/api/jobs/$id" | json status)" != done ]; do sleep 0.05; done
t1=$(date +%s.%N)
kill -INT "$pid"
wait "$pid" || true
echo "$(python3 -c "print(f'{$t1 - $t0:.2f}')") s for $N pictures ($(sed -n 's/^loading //p' "$log"); serve options: ${*:-none})"
