#!/usr/bin/env bash
# `microdit serve` end to end (issue 12), in three ctest steps sharing WORK:
#   serve_e2e.sh fixture BIN WORK   a tiny pixel model: 16 emoji at 16 px -> MiniLM shards -> 6 steps
#   serve_e2e.sh api     BIN WORK   the binary on a free port: curl the API (PNG, 400, 404, traversal),
#                                   then Ctrl-C (SIGINT) must stop it cleanly with exit code 0
#   serve_e2e.sh browser BIN WORK   headless Chromium opens the page with ?prompt=...&autorun=1,
#                                   the generated <img>s must load; screenshots in WORK/shots
# Prints "SKIPPED: ..." (a ctest skip) where fonts, MiniLM or Chromium are missing.
set -euo pipefail
MODE=$1 BIN=$2 WORK=$3
CKPT="$WORK/runs/tiny/checkpoints/step-0000006.safetensors"

fixture() {
  for f in /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf /usr/share/unicode/emoji/emoji-test.txt; do
    [ -f "$f" ] || { echo "SKIPPED: $f missing"; exit 0; }
  done
  "$BIN" encode-text --encoder minilm --text probe >/dev/null 2>&1 || { echo "SKIPPED: MiniLM assets missing"; exit 0; }
  rm -rf "$WORK" && mkdir -p "$WORK"
  "$BIN" dataset emoji --limit 16 --size 16 --out "$WORK/emoji" >/dev/null
  "$BIN" prepare --dataset "$WORK/emoji" --out "$WORK/shards" >/dev/null
  cat > "$WORK/train.yaml" <<YAML
model: {preset: MicroDiT_Pico_2, input_size: 16, in_channels: 3, caption_channels: 384, depth: 2}
data: {shards: $WORK/shards, val_split: 0}
train: {steps: 6, batch_size: 8, mask_ratio: 0.5, unmasked_steps: 2, lr: 1.0e-3, warmup_steps: 2}
run: {out: $WORK/runs/tiny, log_every: 1, checkpoint_every: 6, val_every: 0, sample_every: 3,
      sample_steps: 2, sample_prompts: ["red heart", "blue heart"]}
YAML
  "$BIN" train --config "$WORK/train.yaml" --device cpu >/dev/null
  [ -f "$CKPT" ] || { echo "FAIL: no checkpoint $CKPT"; exit 1; }
  echo "fixture: $CKPT"
}

PID=""
start_server() {  # sets PORT, PID; the server picks a free port (--port 0) and prints it
  [ -f "$CKPT" ] || { echo "SKIPPED: no fixture checkpoint (serve.fixture skipped)"; exit 0; }
  : > "$WORK/serve-$MODE.log"
  "$BIN" serve --ckpt "$CKPT" --runs "$WORK/runs" --port 0 --device cpu --threads 1 > "$WORK/serve-$MODE.log" 2>&1 &
  PID=$!
  trap '[ -n "$PID" ] && kill "$PID" 2>/dev/null || true' EXIT
  PORT=""
  for _ in $(seq 1 300); do
    PORT=$(sed -n 's#^serving on http://[^:]*:\([0-9]*\)/.*#\1#p' "$WORK/serve-$MODE.log")
    [ -n "$PORT" ] && break
    kill -0 "$PID" 2>/dev/null || { echo "FAIL: serve exited:"; cat "$WORK/serve-$MODE.log"; exit 1; }
    sleep 0.1
  done
  [ -n "$PORT" ] || { echo "FAIL: serve did not start"; cat "$WORK/serve-$MODE.log"; exit 1; }
  URL="http://127.0.0.1:$PORT"
}

stop_server() {  # Ctrl-C: a clean stop with exit code 0
  kill -INT "$PID"
  local rc=0
  wait "$PID" || rc=$?
  PID=""
  [ "$rc" -eq 0 ] || { echo "FAIL: serve exited with $rc after SIGINT"; cat "$WORK/serve-$MODE.log"; exit 1; }
  grep -q '^stopped' "$WORK/serve-$MODE.log" || { echo "FAIL: no 'stopped' line"; exit 1; }
}

expect() {  # expect STATUS METHOD PATH [BODY]: the HTTP status, and JSON errors for >= 400
  local want=$1 method=$2 path=$3 body=${4:-}
  local got
  if [ "$method" = POST ]; then
    got=$(curl -s --path-as-is -o "$WORK/body" -w '%{http_code}' -X POST -H 'Content-Type: application/json' --data-binary "$body" "$URL$path")
  else
    got=$(curl -s --path-as-is -o "$WORK/body" -w '%{http_code}' "$URL$path")
  fi
  [ "$got" = "$want" ] || { echo "FAIL: $method $path $body -> $got, expected $want: $(head -c 300 "$WORK/body")"; exit 1; }
  if [ "$want" -ge 400 ]; then grep -q '^{"error":"[^"]*"}$' "$WORK/body" || { echo "FAIL: $path: not a one-line JSON error: $(cat "$WORK/body")"; exit 1; }; fi
  echo "ok $got $method $path"
}

api() {
  command -v curl >/dev/null || { echo "SKIPPED: curl missing (scripts/setup.sh installs it)"; exit 0; }
  start_server
  expect 200 GET /api/info
  expect 200 GET /
  expect 202 POST /api/generate '{"prompt":"red heart","n":2,"steps":3,"cfg":4,"seed":11}'
  id=$(sed -n 's/.*"id":\([0-9]*\).*/\1/p' "$WORK/body")
  status=""
  for _ in $(seq 1 60); do
    curl -s "$URL/api/jobs/$id?after=0" > "$WORK/job.json"
    status=$(sed -n 's/.*"status":"\([a-z]*\)".*/\1/p' "$WORK/job.json")
    { [ "$status" = queued ] || [ "$status" = running ]; } || break
  done
  [ "$status" = done ] || { echo "FAIL: job ended '$status': $(cat "$WORK/job.json")"; exit 1; }
  grep -q '"seed":12' "$WORK/job.json" || { echo "FAIL: no image with seed 12"; exit 1; }
  for i in 0 1; do
    curl -s -o "$WORK/img$i.png" "$URL/api/jobs/$id/images/$i.png"
    [ "$(head -c 8 "$WORK/img$i.png" | od -An -tx1 | tr -d ' \n')" = 89504e470d0a1a0a ] ||
      { echo "FAIL: image $i is not a PNG"; exit 1; }
  done
  echo "ok two PNGs"
  expect 400 POST /api/generate '{"prompt":"x","cfg":-1}'
  expect 400 POST /api/generate '{"prompt":"x","n":100000000}'
  expect 400 POST /api/generate '{"prompt":"x","steps":0}'
  expect 400 POST /api/generate '{"prompt":"","n":1}'
  expect 413 POST /api/generate "{\"prompt\":\"$(head -c 20000 /dev/zero | tr '\0' a)\"}"
  expect 200 GET /api/runs
  expect 200 GET /api/runs/tiny/metrics
  expect 200 GET /api/runs/tiny/samples
  expect 200 GET /api/runs/tiny/files/samples/step-0000006.png
  expect 404 GET /api/runs/tiny/files/../../train.yaml
  expect 404 GET /api/runs/..%2F..%2Fetc/metrics
  expect 404 GET /api/runs/tiny/files/checkpoints/step-0000006.safetensors
  expect 404 GET /../../../etc/passwd
  stop_server
  echo "ok SIGINT stopped the server cleanly"
}

browser() {
  CHROME=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
  [ -n "$CHROME" ] || { echo "SKIPPED: chromium missing (scripts/setup.sh installs it)"; exit 0; }
  start_server
  mkdir -p "$WORK/shots"
  chrome() {  # headless, no profile of the user's, no sandbox (root in CI containers)
    timeout 90 "$CHROME" --headless=new --no-sandbox --disable-gpu --disable-dev-shm-usage --no-first-run \
      --hide-scrollbars --user-data-dir="$WORK/chrome-profile" --virtual-time-budget=30000 "$@" 2>>"$WORK/chrome.log"
  }
  page="$URL/?prompt=red%20heart%2C%20smileys%20%26%20emotion&n=6&steps=8&cfg=4&seed=3&autorun=1"
  chrome --dump-dom "$page" > "$WORK/dom.html"
  loaded=$(grep -o '<img class="gen-img"[^>]*data-loaded="1"' "$WORK/dom.html" | wc -l)
  [ "$loaded" -ge 6 ] || { echo "FAIL: $loaded of 6 generated images loaded in the page"; grep -o '<img[^>]*>' "$WORK/dom.html" | head; exit 1; }
  grep -q 'microdit sample --ckpt' "$WORK/dom.html" || { echo "FAIL: no sample command on the page"; exit 1; }
  echo "ok the page made 6 images (each loaded in the browser)"
  chrome --window-size=1280,1000 --screenshot="$WORK/shots/serve.png" "$page" >/dev/null
  chrome --window-size=390,1100 --screenshot="$WORK/shots/serve-phone.png" "$page" >/dev/null
  chrome --window-size=1280,1400 --screenshot="$WORK/shots/serve-train.png" "$URL/?tab=train" >/dev/null
  for s in serve serve-phone serve-train; do
    [ "$(head -c 8 "$WORK/shots/$s.png" | od -An -tx1 | tr -d ' \n')" = 89504e470d0a1a0a ] ||
      { echo "FAIL: no screenshot $s.png"; exit 1; }
  done
  echo "ok screenshots in $WORK/shots"
  stop_server
}

case "$MODE" in
  fixture) fixture ;;
  api) api ;;
  browser) browser ;;
  *) echo "usage: $0 fixture|api|browser BIN WORK"; exit 2 ;;
esac
