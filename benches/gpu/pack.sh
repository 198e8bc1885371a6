#!/usr/bin/env bash
# Packs what benches/gpu/run.sh needs on the lent GPU machine (which reaches no registry and
# takes at most 64 MiB a call) into .gpu/ (ignored by git), in two parts for two calls:
#   .gpu/p1/  the first ~50 MB of ort-site.tar.zst
#   .gpu/p2/  the rest, the release server (built with --features ort), the CNN kernels' test
#             binary (its CUDA provider test) when one is built, and zstd
# ort-site.tar.zst is PyPI's onnxruntime-gpu 1.31.1 (CUDA 13) package for CPython 3.12, its
# CUDA provider cut to the sm_90 cubins (benches/gpu/fatbin_keep_arch.py): the Python peer
# (raw onnxruntime, CUDA execution provider) and the library the server loads.
#
#   cargo build --release --locked --features ort --bin nightingale
#   cargo test --release --locked --features ort -p nightingale-inference --test cnn_kernels --no-run
#   benches/gpu/pack.sh
#
# `benches/gpu/pack.sh lib` packs instead, in two parts (.gpu/lib1, .gpu/lib2), what
# benches/gpu/shapes.sh needs: ONNX Runtime's C library with its CUDA provider (no Python
# package), the server, the gpu_shapes example and the CNN kernels' test binary, and zstd.
#
# Then, on the device tool: run (carry .gpu/p1) `benches/gpu/run.sh stage1`, and at once
# run (carry .gpu/p2) `benches/gpu/run.sh`.
set -euo pipefail
cd "$(dirname "$0")/../.."
ORT_GPU=${ORT_GPU:-onnxruntime-gpu==1.31.1}
ARCH=${ARCH:-90}
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >>.git/info/exclude
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d "$work" "$ORT_GPU"
mkdir -p "$work/site"
unzip -q "$work"/onnxruntime_gpu-*.whl -d "$work/site"
capi="$work/site/onnxruntime/capi"
python3 benches/gpu/fatbin_keep_arch.py "$capi/libonnxruntime_providers_cuda.so" "$ARCH" "$work/cuda.so"
mv "$work/cuda.so" "$capi/libonnxruntime_providers_cuda.so"
rm -rf "$work/site/onnxruntime/transformers" "$work/site/onnxruntime/quantization" "$work/site/onnxruntime/tools"
pack_bin() { # NAME FILE: stripped and compressed into DIR
  strip -o "$work/$1" "$2"
  zstd -q -19 -T0 "$work/$1" -o "$3/$1.zst"
}
pack_zstd() { # The GPU machine has no zstd: this one travels with its libraries.
  cp /usr/bin/zstd "$1/"
  for lib in $(ldd /usr/bin/zstd | awk '/=> \//{print $3}' | grep -v 'libc.so'); do cp -L "$lib" "$1/"; done
}
test_bin=$(ls -t target/release/deps/cnn_kernels-* 2>/dev/null | grep -v '\.d$' | head -1 || true)
if [ "${1:-}" = lib ]; then
  # One part for benches/gpu/shapes.sh: ONNX Runtime's C library and its CUDA provider only.
  rm -rf .gpu/lib1 .gpu/lib2 && mkdir -p .gpu/lib1 .gpu/lib2
  tar -C "$capi" -cf - libonnxruntime.so.1.31.1 libonnxruntime_providers_cuda.so libonnxruntime_providers_shared.so |
    zstd -q -19 -T0 --long=27 -o "$work/ort-lib.tar.zst"
  split -b 50M -d "$work/ort-lib.tar.zst" "$work/ort-lib.tar.zst.part-"
  mv "$work/ort-lib.tar.zst.part-00" .gpu/lib1/
  mv "$work"/ort-lib.tar.zst.part-* .gpu/lib2/
  pack_bin nightingale target/release/nightingale .gpu/lib2
  pack_bin gpu_shapes target/release/examples/gpu_shapes .gpu/lib2
  [ -n "$test_bin" ] && pack_bin cnn_kernels "$test_bin" .gpu/lib2
  pack_zstd .gpu/lib2
  du -sh .gpu/lib1 .gpu/lib2
  exit 0
fi
tar -C "$work/site" -cf - . | zstd -q -19 -T0 --long=27 -o "$work/ort-site.tar.zst"
rm -rf .gpu && mkdir -p .gpu/p1 .gpu/p2
split -b 50M -d "$work/ort-site.tar.zst" "$work/ort-site.tar.zst.part-"
mv "$work/ort-site.tar.zst.part-00" .gpu/p1/
mv "$work"/ort-site.tar.zst.part-* .gpu/p2/
pack_bin nightingale target/release/nightingale .gpu/p2
[ -n "$test_bin" ] && pack_bin cnn_kernels "$test_bin" .gpu/p2
pack_zstd .gpu/p2
du -sh .gpu/p1 .gpu/p2
