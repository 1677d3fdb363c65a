#!/usr/bin/env bash
# Checks a `make dist` bundle as a worker without Swift would run it: unpacked in a fresh
# folder, started under `env -i` (no PATH, no LD_LIBRARY_PATH), every library it loads
# either in its own lib/ or glibc's; then it quantizes the demo VLM and its output must be
# byte for byte what .build/release/mbq writes (when that binary exists).
# Usage: Scripts/dist-test.sh dist/mbq-VERSION-linux-x86_64.tar.xz
set -euo pipefail
tarball=$(realpath "${1:?usage: dist-test.sh BUNDLE.tar.xz}")
repo=$(pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tar -C "$work" -xJf "$tarball"
dir=$(echo "$work"/mbq-*)
fail() { echo "dist-test: $*" >&2; exit 1; }
# Where the loader finds each library with an empty environment.
env -i LD_TRACE_LOADED_OBJECTS=1 "$dir/mbq" > "$work/loaded.txt" || fail "the loader cannot start $dir/mbq"
if grep -q "not found" "$work/loaded.txt"; then fail "missing libraries: $(grep 'not found' "$work/loaded.txt" | tr -s ' \t' ' ')"; fi
outside=$(awk '$2 == "=>" && $3 ~ /^\// { print $3 }' "$work/loaded.txt" | grep -v "^$dir/lib/" \
  | grep -Ev '/(libc|libm|libpthread|libdl|librt|libresolv)\.so|/ld-linux' || true)
[ -z "$outside" ] || fail "loads libraries from outside the bundle: $outside"
grep -q "libswiftCore" "$work/loaded.txt" && fail "the Swift runtime is not linked in (libswiftCore loaded)"
echo "dist-test: $(awk '$2 == "=>"' "$work/loaded.txt" | grep -c "$dir/lib/") libraries from the bundle's lib/, the rest glibc"
env -i "$dir/mbq" --help > /dev/null || fail "mbq --help failed under env -i"
env -i "$dir/mbq" quantize --model "$repo/Demo/model" --calib "$repo/Demo/calib-seed0.safetensors" --method awq --w-bit 4 \
  --out "$work/out" > "$work/quantize.log" 2>&1 || { tail -5 "$work/quantize.log"; fail "quantize failed under env -i"; }
echo "dist-test: quantized the demo VLM under env -i"
if [ -x "$repo/.build/release/mbq" ]; then
  "$repo/.build/release/mbq" quantize --model "$repo/Demo/model" --calib "$repo/Demo/calib-seed0.safetensors" --method awq --w-bit 4 \
    --out "$work/ref" > /dev/null 2>&1
  for f in $(cd "$work/ref" && ls | grep -v -e mbq_results.json -e report.md); do
    cmp -s "$work/ref/$f" "$work/out/$f" || fail "$f differs from .build/release/mbq's output"
  done
  echo "dist-test: output identical to .build/release/mbq's"
fi
echo "dist-test: passed"
