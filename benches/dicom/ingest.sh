#!/usr/bin/env bash
# DICOM ingest benchmark (not a test): COUNT real instances (benches/dicom/make_instances.py:
# pydicom + pydicom-data CT and MR files with fresh SOP Instance UIDs) sent by dcmtk's storescu
# to
#   (a) Nightingale `serve --dicom-port` (fsync on: every acknowledged instance is durable), and
#   (b) dcmtk's storescp --fork (TCP_NODELAY=1; writes its files without fsync),
# side by side in one run, on 1 association and on 4 concurrent associations (4 storescu
# processes with COUNT/4 files each). Both receivers write to the same disk (a folder under
# target/, or $WORK). Prints a Markdown table (instances/s, MB/s, Nightingale/dcmtk) and the
# measured per-instance durable-store cost (benches/dicom/fsync_cost.py) on the same disk.
#
#   cargo build --release          # or NIGHTINGALE_BIN=target/debug/nightingale
#   benches/dicom/ingest.sh        # COUNT=1000 ROUNDS=1 by default
#
# Each timed run starts after a `sync` and the order of the receivers alternates between
# rounds: dcmtk leaves its files to the kernel's write-back, which would otherwise run during
# the next receiver's run (the time that sync takes after dcmtk is printed at the end).
# Nothing is deleted between rounds: ext4 without a journal (this project's VM) will not
# reuse an inode freed in the last minutes, and every file created after a mass deletion
# pays a scan past the freed ones (`recently_deleted` in a profile), which would charge one
# round's clean-up to the next receiver. KEEP_WORK=1 leaves $WORK for the caller to delete
# after its last run (so that back-to-back runs do not charge each other either).
#
# Needs: dcmtk (storescu, storescp, echoscu), Python with pydicom and pydicom-data (.venv).
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${NIGHTINGALE_BIN:-target/release/nightingale}
PY=${PYTHON:-.venv/bin/python}
COUNT=${COUNT:-1000}
ROUNDS=${ROUNDS:-1}
PDU=65536 # both receivers offer the same maximum PDU (Nightingale's default)
export TCP_NODELAY=1

for tool in storescu storescp echoscu; do
    command -v "$tool" >/dev/null || { echo "$tool not found: apt-get install dcmtk" >&2; exit 1; }
done
[ -x "$BIN" ] || { echo "$BIN not found: cargo build --release" >&2; exit 1; }
mkdir -p target
WORK=${WORK:-$(mktemp -d "$PWD/target/dicom-ingest.XXXXXX")}
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [ "${KEEP_WORK:-0}" = 1 ] || rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
now() { date +%s.%N; }

"$PY" benches/dicom/make_instances.py "$WORK/in" --count "$COUNT" --parts 4
BYTES=$(cat "$WORK"/in/part*/*.dcm | tee /dev/null | wc -c) # also warms the page cache
mkdir -p "$WORK/models"

start_nightingale() { # data dir -> sets NG_PORT, NG_PID
    NG_PORT=$(free_port)
    local http; http=$(free_port)
    "$BIN" serve --repository "$WORK/models" --http-addr "127.0.0.1:$http" --data-dir "$1" \
        --dicom-port "$NG_PORT" >"$1.log" 2>&1 &
    NG_PID=$!
    PIDS+=("$NG_PID")
    for _ in $(seq 600); do
        grep -q "listening (DICOM)" "$1.log" 2>/dev/null && return 0
        kill -0 "$NG_PID" 2>/dev/null || break
        sleep 0.1
    done
    echo "Nightingale did not start:" >&2; cat "$1.log" >&2; exit 1
}

start_storescp() { # output dir -> sets SCP_PORT, SCP_PID
    SCP_PORT=$(free_port)
    mkdir -p "$1"
    storescp --fork +xa -pdu "$PDU" -aet STORESCP -od "$1" "$SCP_PORT" >"$1.log" 2>&1 &
    SCP_PID=$!
    PIDS+=("$SCP_PID")
    for _ in $(seq 600); do
        echoscu -aec STORESCP 127.0.0.1 "$SCP_PORT" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "storescp did not start" >&2; exit 1
}

send() { # port called-AE associations -> prints seconds
    local port=$1 aet=$2 n=$3 t0 t1
    t0=$(now)
    if [ "$n" = 1 ]; then
        storescu -aec "$aet" --max-pdu "$PDU" 127.0.0.1 "$port" +sd +r "$WORK/in" >"$WORK/scu.log" 2>&1
    else
        local pids=()
        for p in 0 1 2 3; do
            storescu -aec "$aet" --max-pdu "$PDU" 127.0.0.1 "$port" +sd "$WORK/in/part$p" \
                >"$WORK/scu$p.log" 2>&1 &
            pids+=($!)
        done
        for pid in "${pids[@]}"; do wait "$pid"; done
    fi
    t1=$(now)
    echo "$t1 - $t0" | bc -l
}

count_indexed() { "$PY" -c 'import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute("SELECT count(*) FROM instances").fetchone()[0])' "$1/spool/index.sqlite3"; }

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; } # user + system, clock ticks
# storescp --fork: the parent's time, its reaped children's, and that of the children
# (running or not yet reaped) it has now.
tree_ticks() {
    local t c
    t=$(awk '{print $14 + $15 + $16 + $17}' "/proc/$1/stat")
    for c in $(ps -o pid= --ppid "$1"); do
        t=$((t + $(awk '{print $14 + $15}' "/proc/$c/stat" 2>/dev/null || echo 0)))
    done
    echo "$t"
}
# The whole machine (/proc/stat's cpu line): "busy idle" clock ticks, iowait counted as idle.
machine_ticks() { awk '/^cpu /{print $2 + $3 + $4 + $7 + $8, $5 + $6}' /proc/stat; }
idle_share() { # "busy idle" before, after -> percent of the machine's time idle
    local b0 i0 b1 i1
    read -r b0 i0 <<<"$1"; read -r b1 i1 <<<"$2"
    printf '%.0f' "$(echo "100 * ($i1 - $i0) / ($b1 - $b0 + $i1 - $i0)" | bc -l)"
}
ms_per_instance() { printf '%.2f' "$(echo "($2 - $1) * 1000 / $(getconf CLK_TCK) / $COUNT" | bc -l)"; }

rate() { printf '%.0f' "$(echo "$COUNT / $1" | bc -l)"; }
mbs() { printf '%.1f' "$(echo "$BYTES / $1 / 1000000" | bc -l)"; }

echo "| associations | receiver | seconds | instances/s | MB/s | Nightingale ÷ dcmtk | receiver CPU ms/instance | machine idle % |"
echo "|---|---|---|---|---|---|---|---|"
SYNCS=() # dcmtk's deferred writes: how long a sync took after each of its runs
NG_SYNCS=() # the same after each Nightingale run
for round in $(seq "$ROUNDS"); do
    # Odd rounds Nightingale first, even rounds dcmtk first; each timed run starts after a
    # sync (untimed), so that no receiver's deferred write-back lands in the other's run.
    if [ $((round % 2)) = 1 ]; then order="ng dcmtk"; else order="dcmtk ng"; fi
    for assoc in 1 4; do
        run="$WORK/r$round-a$assoc"
        start_nightingale "$run-ng"
        start_storescp "$run-dcmtk"
        for who in $order; do
            sync
            if [ "$who" = ng ]; then
                cpu0=$(cpu_ticks "$NG_PID"); m0=$(machine_ticks)
                ng=$(send "$NG_PORT" NIGHTINGALE "$assoc")
                cpu1=$(cpu_ticks "$NG_PID"); ng_idle=$(idle_share "$m0" "$(machine_ticks)")
                ng_cpu=$(ms_per_instance "$cpu0" "$cpu1")
                # Its deferred writes (none expected: every instance is fsynced), timed
                # the same way as dcmtk's below.
                t0=$(now); sync; NG_SYNCS+=("$(echo "$(now) - $t0" | bc -l)")
            else
                dcpu0=$(tree_ticks "$SCP_PID"); m0=$(machine_ticks)
                dc=$(send "$SCP_PORT" STORESCP "$assoc")
                dc_idle=$(idle_share "$m0" "$(machine_ticks)")
                sleep 0.2 # the children exit after the release
                dcpu1=$(tree_ticks "$SCP_PID")
                dc_cpu=$(ms_per_instance "$dcpu0" "$dcpu1")
                t0=$(now); sync; SYNCS+=("$(echo "$(now) - $t0" | bc -l)")
            fi
        done
        indexed=$(count_indexed "$run-ng")
        received=$(find "$run-dcmtk" -type f ! -name '*.log' | wc -l)
        kill "$NG_PID" "$SCP_PID" 2>/dev/null || true
        wait "$NG_PID" "$SCP_PID" 2>/dev/null || true
        if [ "$indexed" != "$COUNT" ] || [ "$received" != "$COUNT" ]; then
            echo "incomplete run: Nightingale indexed $indexed, storescp wrote $received of $COUNT" >&2
            exit 1
        fi
        ratio=$(printf '%.2f' "$(echo "$dc / $ng" | bc -l)")
        echo "| $assoc | Nightingale (fsync) | $(printf '%.2f' "$ng") | $(rate "$ng") | $(mbs "$ng") | **${ratio}×** | $ng_cpu | $ng_idle |"
        echo "| $assoc | dcmtk storescp (no fsync) | $(printf '%.2f' "$dc") | $(rate "$dc") | $(mbs "$dc") | 1 | $dc_cpu | $dc_idle |"
    done
done
echo
echo "sync after each dcmtk run (its data reaching the disk, not timed above): $(printf '%.2f s ' "${SYNCS[@]}")"
echo "sync after each Nightingale run (the same): $(printf '%.2f s ' "${NG_SYNCS[@]}")"
echo
echo "$COUNT instances, $BYTES bytes of Part 10 files; receivers on $(df --output=source,fstype "$WORK" | tail -1)"
"$PY" benches/dicom/fsync_cost.py "$WORK" --runs 200
