#!/usr/bin/env python3
"""Zeroes, in a CUDA shared library, the machine code (cubins) of every GPU architecture but
one, keeping the file's size and layout: the device tool carries at most 64 MiB a call, and
onnxruntime-gpu's CUDA provider (284 MB, 52 MB with zstd once only sm_90 is left, 186 MB
without) holds cubins for sm_75, 80, 86, 89, 90 and 120 and no PTX. The CUDA driver picks
the cubin that matches the device (an H200 runs sm_90 code only: cubins of another major
version never load there), so the zeroed entries are never read; the kept entries are
byte-identical, and so is everything outside `.nv_fatbin`.

Walks every fat binary in the `.nv_fatbin` section (header magic 0xBA55ED50, then entries
of kind 1 = PTX, 2 = ELF cubin, each with its architecture) and refuses to write anything if
the walk does not end exactly at each fat binary's end, or if no entry of the kept
architecture exists (or any PTX would be lost).

    benches/gpu/fatbin_keep_arch.py libonnxruntime_providers_cuda.so 90 out.so
"""

import struct
import subprocess
import sys
from collections import Counter

MAGIC = 0xBA55ED50


def section(path: str, name: str) -> tuple[int, int]:
    out = subprocess.run(["readelf", "-S", "-W", path], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        fields = line.replace("[ ", "[").split()
        if name in fields:
            i = fields.index(name)
            return int(fields[i + 3], 16), int(fields[i + 4], 16)
    sys.exit(f"{path}: no {name} section")


def main() -> None:
    path, keep, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    data = bytearray(open(path, "rb").read())
    start, size = section(path, ".nv_fatbin")
    pos, end = start, start + size
    kept, zeroed, fatbins = Counter(), Counter(), 0
    while pos < end:
        magic, _version, header, fat_size = struct.unpack_from("<IHHQ", data, pos)
        if magic != MAGIC:
            pos += 8  # alignment padding between fat binaries
            continue
        fatbins += 1
        entry, fat_end = pos + header, pos + header + fat_size
        while entry < fat_end:
            kind, _v, entry_header, padded = struct.unpack_from("<HHII", data, entry)
            arch = struct.unpack_from("<I", data, entry + 28)[0]
            if kind == 1:
                sys.exit(f"{path}: a PTX entry (sm_{arch}) would be lost; refusing")
            body = slice(entry + entry_header, entry + entry_header + padded)
            if kind == 2 and arch == keep:
                kept[arch] += padded
            else:
                data[body] = bytes(padded)
                zeroed[arch] += padded
            entry += entry_header + padded
        if entry != fat_end:
            sys.exit(f"{path}: fat binary at {pos:#x} does not end where its header says; refusing")
        pos = fat_end
    if not kept:
        sys.exit(f"{path}: no sm_{keep} cubin; refusing")
    open(out, "wb").write(data)
    print(f"{fatbins} fat binaries: kept sm_{keep} ({kept[keep]} bytes), zeroed "
          + ", ".join(f"sm_{a} ({n})" for a, n in sorted(zeroed.items())))


if __name__ == "__main__":
    main()
