#!/usr/bin/env bash
# `make dist`: a relocatable bundle of mbq for machines without a Swift toolchain (the
# workers of a cluster; docs/OPERATIONS.md, "Copying mbq to workers"):
#   dist/mbq-VERSION-linux-x86_64.tar.xz
#     mbq-VERSION-linux-x86_64/mbq        release build, Swift runtime and Foundation linked in
#     mbq-VERSION-linux-x86_64/kernels/   the CUDA backend's kernel source (also compiled into mbq,
#                                         which NVRTC builds for the GPU it finds at run time)
#     mbq-VERSION-linux-x86_64/lib/       OpenBLAS, libzmq and what they load, found through
#                                         the binary's rpath $ORIGIN/lib (DT_RPATH, so it
#                                         also serves the libraries' own dependencies)
# glibc (libc, libm, libpthread, libdl, librt, the loader) is the target machine's own.
# Then unpacks the bundle and checks it (Scripts/dist-test.sh).
# Usage: Scripts/make-dist.sh VERSION [SWIFT-BUILD-FLAGS...]
set -euo pipefail
version=${1:?usage: make-dist.sh VERSION [swift build flags]}; shift
scratch=.build-dist
if ! command -v xz >/dev/null; then
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq xz-utils >/dev/null
  else echo "make-dist: xz is missing: run  sudo apt-get install -y xz-utils" >&2; exit 1; fi
fi
swift build -c release --product mbq --static-swift-stdlib --scratch-path "$scratch" "$@" \
  -Xlinker --disable-new-dtags -Xlinker -rpath -Xlinker '$ORIGIN/lib'
name=mbq-$version-linux-x86_64
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/$name/lib"
cp "$scratch/release/mbq" "$stage/$name/mbq"
strip "$stage/$name/mbq" 2>/dev/null || true
# Every shared library the loader resolves for it, but glibc's.
ldd "$stage/$name/mbq" | awk '$2 == "=>" && $3 ~ /^\// { print $3 }' | while read -r lib; do
  case "$(basename "$lib")" in
    libc.so.*|libm.so.*|libpthread.so.*|libdl.so.*|librt.so.*|ld-linux*|libresolv.so.*) ;;
    *) cp -L "$lib" "$stage/$name/lib/" ;;
  esac
done
cp README.md "$stage/$name/"
mkdir -p "$stage/$name/kernels"
cp Sources/CMBQKernels/kernels/mbq_kernels.cuh "$stage/$name/kernels/"
mkdir -p dist
tar -C "$stage" -cJf "dist/$name.tar.xz.tmp" "$name"
mv "dist/$name.tar.xz.tmp" "dist/$name.tar.xz"
echo "dist/$name.tar.xz: $(du -h "dist/$name.tar.xz" | cut -f1) ($(ls "$stage/$name/lib" | wc -l) libraries in lib/)"
bash Scripts/dist-test.sh "dist/$name.tar.xz"
