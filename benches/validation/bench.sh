#!/usr/bin/env bash
# Validation harness speed (issue 11), side by side in one run. Not a test.
#  1. Bootstrap: 100,000 synthetic predictions, 2,000 replicates of AUROC, AP and Brier:
#     `nightingale validate --predictions` (release) vs scikit-learn in a Python loop
#     (benches/validation/bootstrap_sklearn.py) on the same file.
#  2. Throughput on wdbc-malignancy v1: `nightingale validate --dataset` on the test split
#     repeated to ROWS rows vs the KServe API of a running server on the same rows (64-row
#     JSON requests at 4 connections, tritonclient-free: benches/validation/kserve_rows.py).
#
#   benches/validation/bench.sh      (needs .venv from scripts/test.sh; N, REPLICATES, ROWS)
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${N:-100000}
REPLICATES=${REPLICATES:-2000}
ROWS=${ROWS:-100000}
VENV=${NIGHTINGALE_VENV:-.venv}
BIN=${NIGHTINGALE_BIN:-target/release/nightingale}
[ -x "$BIN" ] || cargo build --release --locked --quiet
work=$(mktemp -d)
trap 'kill ${pid:-} 2>/dev/null || true; rm -rf "$work"' EXIT
"$VENV/bin/python" - "$work/pred.csv" "$N" <<'PY'
import sys, numpy as np
rng = np.random.default_rng(1)
n = int(sys.argv[2])
y = (rng.random(n) < 0.3).astype(int)
p = 1 / (1 + np.exp(-(rng.normal(0, 1, n) + 1.5 * y - 1.0)))
with open(sys.argv[1], "w") as f:
    f.write("label,score\n")
    for a, b in zip(y, p):
        f.write(f"{int(a)},{float(b)!r}\n")
PY
start=$(date +%s.%N)
"$BIN" validate --predictions "$work/pred.csv" --bootstrap "$REPLICATES" --out "$work/r" --quiet
ng=$(echo "$(date +%s.%N) - $start" | bc)
py=$("$VENV/bin/python" benches/validation/bootstrap_sklearn.py "$work/pred.csv" "$REPLICATES")
pysecs=$("$VENV/bin/python" -c "import json,sys; print(json.loads(sys.argv[1])['seconds'])" "$py")
echo "BOOTSTRAP rows=$N replicates=$REPLICATES nightingale_s=$ng (whole command: read, metrics, report) sklearn_s=$pysecs (bootstrap loop only) ratio=$(echo "scale=1; $pysecs / $ng" | bc)x"
"$VENV/bin/python" -c "import json; r=json.load(open('$work/r/report.json')); b=r['auroc']['bootstrap']; print('  nightingale auroc bootstrap CI', b['ci_lower'], b['ci_upper'])"
echo "  sklearn $py"

# 2. throughput on wdbc-malignancy
"$VENV/bin/python" - "$work/rows.csv" "$ROWS" <<'PY'
import sys
lines = open("models/bundles/wdbc-malignancy/testdata/test.csv").read().splitlines()
n = int(sys.argv[2])
with open(sys.argv[1], "w") as f:
    f.write(lines[0] + "\n")
    body = lines[1:]
    for i in range(n):
        f.write(body[i % len(body)] + "\n")
PY
start=$(date +%s.%N)
"$BIN" validate --model wdbc-malignancy@1 --dataset "$work/rows.csv" --bootstrap 0 --out "$work/t" --quiet --audit-log "$work/t-audit.jsonl"
vs=$(echo "$(date +%s.%N) - $start" | bc)
echo "VALIDATE rows=$ROWS seconds=$vs rows_per_s=$(echo "$ROWS / $vs" | bc)"
port=$("$VENV/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$BIN" serve --http-addr "127.0.0.1:$port" --data-dir "$work/data" 2>"$work/server.log" &
pid=$!
for _ in $(seq 150); do curl -sf "127.0.0.1:$port/v2/health/ready" >/dev/null && break; sleep 0.2; done
"$VENV/bin/python" benches/validation/kserve_rows.py "127.0.0.1:$port" "$work/rows.csv"
echo "CPU: $(nproc) cores; load average $(cut -d' ' -f1-3 /proc/loadavg)"
