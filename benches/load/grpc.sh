#!/usr/bin/env bash
# KServe v2 gRPC vs HTTP (issue 13): one release server with both listeners, the Rust load
# generator benches/grpc_http_load.rs at 1 and 16 clients (one connection each), 1-row
# infers on wdbc-malignancy@1 asking for `probabilities`: HTTP JSON, HTTP binary (Triton's
# binary tensor extension) and gRPC (raw_input_contents, as tritonclient.grpc sends them);
# rounds interleaved, medians printed as a markdown table (docs/performance.md §15).
#
#   benches/load/grpc.sh                  # SECONDS_PER_RUN=5 ROUNDS=3 CLIENTS=1,16 [KINDS=grpc,http-json] [NIGHTINGALE_BIN=…]
set -euo pipefail
cd "$(dirname "$0")/../.."
SECONDS_PER_RUN=${SECONDS_PER_RUN:-5}
ROUNDS=${ROUNDS:-3}
CLIENTS=${CLIENTS:-1,16}
cargo build --release --locked --features grpc --bin nightingale --bench grpc_http_load
bin=${NIGHTINGALE_BIN:-target/release/nightingale} # another build to compare: NIGHTINGALE_BIN=…
load=$(ls -t target/release/deps/grpc_http_load-* | grep -v '\.d$' | head -1)
work=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
http_port=$(free_port)
grpc_port=$(free_port)
"$bin" serve --http-addr "127.0.0.1:$http_port" --grpc-addr "127.0.0.1:$grpc_port" \
  --data-dir "$work/data" --audit-log "$work/audit.jsonl" --log-format json 2>"$work/server.log" &
pid=$!
for _ in $(seq 300); do
  curl -sf "127.0.0.1:$http_port/v2/health/ready" >/dev/null && break
  kill -0 "$pid" || { cat "$work/server.log"; exit 1; }
  sleep 0.2
done
curl -sf "127.0.0.1:$http_port/v2/health/ready" >/dev/null || { echo "server not ready"; cat "$work/server.log"; exit 1; }
echo "server: $bin ($(git rev-parse --short HEAD)); $(nproc) cores; load generator: 2 threads"
"$load" --http "127.0.0.1:$http_port" --grpc "127.0.0.1:$grpc_port" \
  --seconds "$SECONDS_PER_RUN" --rounds "$ROUNDS" --clients "$CLIENTS" ${KINDS:+--kinds "$KINDS"}
# Every measured request was audited: the chain must verify.
"$bin" audit verify "$work/audit.jsonl"
