#!/usr/bin/env bash
# Where the DICOM SCP spends its CPU (not a test): a storm of 4 storescu associations
# (COUNT instances from benches/dicom/make_instances.py) into a release `nightingale serve
# --dicom-port`, fsync on, then the server's CPU per instance from /proc/<pid>/stat; with
# PERF=1 also `perf record --call-graph dwarf` of the server and a summary of the samples by
# what they were doing (benches/dicom/perf_summary.py).
#
#   cargo build --release
#   benches/dicom/profile.sh                  # RUNS=3 storms, one line each
#   PERF=1 RUNS=1 benches/dicom/profile.sh    # and a profile (needs `perf`)
#
# Each storm writes to a fresh folder and nothing is deleted until the end: ext4 without a
# journal (this VM's) scans past inodes deleted in the last 5-35 s when it creates a file,
# which would charge one storm for the deletions of the one before.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${NIGHTINGALE_BIN:-target/release/nightingale}
PY=${PYTHON:-.venv/bin/python}
COUNT=${COUNT:-1000}
RUNS=${RUNS:-3}
export TCP_NODELAY=1 # as for storescp in ingest.sh: dcmtk's Nagle setting
unset RUST_BACKTRACE RUST_LIB_BACKTRACE # errors the parsers expect must not capture stacks

mkdir -p target
WORK=${WORK:-$(mktemp -d "$PWD/target/dicom-profile.XXXXXX")}
trap '[ "${KEEP_WORK:-0}" = 1 ] || rm -rf "$WORK"' EXIT # KEEP_WORK=1: the caller deletes it
"$PY" benches/dicom/make_instances.py "$WORK/in" --count "$COUNT" --parts 4 >/dev/null
cat "$WORK"/in/part*/*.dcm >/dev/null # warm the page cache
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

for run in $(seq "$RUNS"); do
    dir="$WORK/run$run"
    mkdir -p "$dir/models"
    port=$(free_port)
    "$BIN" serve --repository "$dir/models" --http-addr "127.0.0.1:$(free_port)" \
        --data-dir "$dir/data" --dicom-port "$port" >"$dir/log" 2>&1 &
    pid=$!
    for _ in $(seq 600); do grep -qs "listening (DICOM)" "$dir/log" && break; sleep 0.1; done
    c0=$(awk '{print $14 + $15}' "/proc/$pid/stat")
    if [ "${PERF:-0}" = 1 ]; then
        perf record -F 1000 --call-graph dwarf,16384 -p "$pid" -o "$WORK/perf.data" 2>/dev/null &
        perf_pid=$!
        sleep 0.5
    fi
    t0=$(date +%s.%N)
    scus=()
    for p in 0 1 2 3; do
        storescu -aec NIGHTINGALE --max-pdu 65536 127.0.0.1 "$port" +sd "$WORK/in/part$p" \
            >"$dir/scu$p.log" 2>&1 &
        scus+=($!)
    done
    for s in "${scus[@]}"; do wait "$s"; done
    t1=$(date +%s.%N)
    c1=$(awk '{print $14 + $15}' "/proc/$pid/stat")
    if [ "${PERF:-0}" = 1 ]; then kill -INT "$perf_pid"; wait "$perf_pid" || true; fi
    kill "$pid"; wait "$pid" || true
    printf 'storm %d: %.0f instances/s, server CPU %.2f ms/instance\n' "$run" \
        "$(echo "$COUNT / ($t1 - $t0)" | bc -l)" \
        "$(echo "($c1 - $c0) * 1000 / $(getconf CLK_TCK) / $COUNT" | bc -l)"
done
if [ "${PERF:-0}" = 1 ]; then
    perf script -i "$WORK/perf.data" 2>/dev/null | "$PY" benches/dicom/perf_summary.py
fi
