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
tar -C "$work/site" -cf - . | zstd -q -19 -T0 --long=27 -o "$work/ort-site.tar.zst"
rm -rf .gpu && mkdir -p .gpu/p1 .gpu/p2
split -b 50M -d "$work/ort-site.tar.zst" "$work/ort-site.tar.zst.part-"
mv "$work/ort-site.tar.zst.part-00" .gpu/p1/
mv "$work"/ort-site.tar.zst.part-* .gpu/p2/
strip -o "$work/nightingale" target/release/nightingale
zstd -q -19 -T0 "$work/nightingale" -o .gpu/p2/nightingale.zst
test_bin=$(ls -t target/release/deps/cnn_kernels-* 2>/dev/null | grep -v '\.d$' | head -1 || true)
if [ -n "$test_bin" ]; then
  strip -o "$work/cnn_kernels" "$test_bin"
  zstd -q -19 -T0 "$work/cnn_kernels" -o .gpu/p2/cnn_kernels.zst
fi
# The GPU machine has no zstd: this one travels with its libraries.
cp /usr/bin/zstd .gpu/p2/
for lib in $(ldd /usr/bin/zstd | awk '/=> \//{print $3}' | grep -v 'libc.so'); do cp -L "$lib" .gpu/p2/; done
du -sh .gpu/p1 .gpu/p2
