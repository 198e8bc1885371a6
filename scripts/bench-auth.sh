#!/usr/bin/env bash
# Cost of authentication on the inference path: requests/s of one small inference
# (wdbc-malignancy, 1 row) at 16 connections without credentials, with an API key and with
# an RS256 JWT (the test fixtures' token), on the same server (anonymous_roles = ["infer"],
# one infer key, the fixtures' JWKS), runs alternated.
# Usage: scripts/bench-auth.sh [path/to/nightingale] [seconds per run] [rounds]
# Needs wrk (Debian: apt-get install -y wrk).
set -euo pipefail
BIN=$(realpath "${1:-target/release/nightingale}")
SECS=${2:-5}
ROUNDS=${3:-3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d)
trap 'kill "$PID" 2>/dev/null || true; rm -rf "$WORK"' EXIT
mkdir -p "$WORK/repository"
cp -r "$ROOT/models/bundles/wdbc-malignancy" "$WORK/repository/"
KEY=bench-infer-key-0123456789abcdef
cat > "$WORK/nightingale.toml" <<TOML
[auth]
anonymous_roles = ["infer"]

[[auth.api_keys]]
name = "bench"
role = "infer"
sha256 = "$(printf %s "$KEY" | sha256sum | cut -d' ' -f1)"

[auth.jwt]
issuer = "https://idp.test.invalid/realms/nightingale"
audience = "nightingale"
jwks_file = "jwks.json"
TOML
cp "$ROOT/tests/fixtures/auth/jwks.json" "$WORK/"
JWT=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["rs256_infer"]["token"])' "$ROOT/tests/fixtures/auth/tokens.json")
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
(cd "$WORK" && exec "$BIN" serve --config nightingale.toml --repository repository \
    --http-addr "127.0.0.1:$PORT" --data-dir data) > "$WORK/server.log" 2>&1 &
PID=$!
for _ in $(seq 600); do
  curl -sf "http://127.0.0.1:$PORT/v2/health/ready" >/dev/null && break
  sleep 0.1
done
ROW=$(python3 -c 'print(",".join(["1.0"]*30))')
cat > "$WORK/infer.lua" <<LUA
wrk.method = "POST"
wrk.body = '{"inputs":[{"name":"features","shape":[1,30],"datatype":"FP32","data":[$ROW]}]}'
wrk.headers["Content-Type"] = "application/json"
local key = os.getenv("KEY")
if key and key ~= "" then wrk.headers["Authorization"] = "Bearer " .. key end
LUA
URL="http://127.0.0.1:$PORT/v2/models/wdbc-malignancy/infer"
# Both answer 200 (checked once before measuring).
test "$(curl -s -o /dev/null -w '%{http_code}' -d @<(echo '{"inputs":[{"name":"features","shape":[1,30],"datatype":"FP32","data":['"$ROW"']}]}') "$URL")" = 200
test "$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $KEY" -d @<(echo '{"inputs":[{"name":"features","shape":[1,30],"datatype":"FP32","data":['"$ROW"']}]}') "$URL")" = 200
for round in $(seq "$ROUNDS"); do
  for mode in none api-key jwt-rs256; do
    k=""; [ "$mode" = api-key ] && k=$KEY; [ "$mode" = jwt-rs256 ] && k=$JWT
    out=$(KEY=$k wrk -t4 -c16 -d"${SECS}s" -s "$WORK/infer.lua" "$URL")
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    bad=$(awk '/Non-2xx/ {print $NF}' <<<"$out")
    echo "round $round $mode: $rps requests/s, non-2xx: ${bad:-0}"
  done
done
