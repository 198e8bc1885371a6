#!/usr/bin/env python3
"""Summarises `perf script` output (with call graphs) of the DICOM SCP: the share of samples
whose stack contains each activity (a sample counts for every activity on its stack, so the
shares overlap), then the hottest leaf functions.

    perf script -i perf.data | python3 benches/dicom/perf_summary.py
"""

from __future__ import annotations

import collections
import re
import sys

# activity -> a regular expression over the frames of a sample
ACTIVITIES = {
    "receive PDUs (socket + parse)": r"scp::receive|read_pdu_from_wire",
    "socket recv (kernel copy)": r"sys_recvfrom",
    "SHA-256 of the data sets": r"digest_blocks",
    "memcpy": r"^__memcpy|^__memmove",
    "Upload::append (hash + copy)": r"Upload::append",
    "create temporary file": r"sys_openat",
    "write the file": r"write_image|write_part10",
    "fsync (file + folder)": r"sys_fsync",
    "link / unlink": r"sys_link|sys_unlink",
    "directory syncer thread": r"DirSyncer::run",
    "index (SQLite)": r"sqlite3|rusqlite",
    "audit trail": r"audit::",
    "context switches": r"finish_task_switch",
    "command parse": r"parse_command",
    "structure walk": r"structure::walk",
    "backtrace capture": r"Backtrace",
    "malloc / free": r"^(malloc|free|_int_malloc|_int_free|realloc|_int_realloc|cfree)$",
}


def samples(text: str):
    for block in text.split("\n\n"):
        frames = []
        for line in block.strip().split("\n")[1:]:
            parts = line.strip().split(None, 1)
            if len(parts) == 2:
                frames.append(re.sub(r"\+0x[0-9a-f]+", "", parts[1].rsplit(" (", 1)[0]))
        if frames:
            yield frames


def main() -> None:
    all_samples = list(samples(sys.stdin.read()))
    total = len(all_samples)
    if not total:
        sys.exit("no samples")
    share = collections.Counter()
    leaves = collections.Counter()
    for frames in all_samples:
        leaves[frames[0]] += 1
        for name, pattern in ACTIVITIES.items():
            if any(re.search(pattern, f) for f in frames):
                share[name] += 1
    print(f"{total} samples; share of samples with each activity on the stack:")
    for name, n in share.most_common():
        print(f"  {100 * n / total:5.1f} %  {name}")
    print("hottest leaf functions:")
    for name, n in leaves.most_common(12):
        print(f"  {100 * n / total:5.1f} %  {name[:100]}")


if __name__ == "__main__":
    main()
