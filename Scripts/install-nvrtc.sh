#!/usr/bin/env bash
# Installs NVRTC (the nvidia-cuda-nvrtc wheel from PyPI, pinned to the GPU machine's
# CUDA 13.0 driver; ../shared/CUDA.md) into a cached folder, for the kernel-compile test
# of `make test`: NVRTC compiles kernels/mbq_kernels.cuh for sm_80 and sm_90 with no GPU
# and no CUDA toolkit. Only libnvrtc and its builtins are kept (114 MB; the wheel's .alt
# variants and headers are not needed). Runs again only when the pin changes.
#   Scripts/install-nvrtc.sh DIR     -> DIR/lib/libnvrtc.so.13, DIR/lib/libnvrtc-builtins.so.13.0
set -euo pipefail
dir=${1:?usage: install-nvrtc.sh DIR}
wheel_spec=nvidia-cuda-nvrtc==13.0.88
lib="$dir/lib"
if [ -f "$lib/libnvrtc.so.13" ] && [ -f "$lib/libnvrtc-builtins.so.13.0" ] && [ "$(cat "$dir/version" 2>/dev/null)" = "$wheel_spec" ]; then
  exit 0
fi
if ! python3 -m pip --version >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip >/dev/null
  else
    echo "install-nvrtc: python3's pip is missing: run  sudo apt-get install -y python3-pip" >&2; exit 1
  fi
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "installing NVRTC ($wheel_spec) into $dir"
python3 -m pip download --no-deps -q -d "$tmp" "$wheel_spec"
python3 - "$tmp" "$tmp/lib" <<'PY'
import glob, os, sys, zipfile
wheel = glob.glob(os.path.join(sys.argv[1], "*.whl"))[0]
os.makedirs(sys.argv[2])
with zipfile.ZipFile(wheel) as z:
    for name in ("libnvrtc.so.13", "libnvrtc-builtins.so.13.0"):
        member = next(m for m in z.namelist() if m.endswith("/lib/" + name))
        with z.open(member) as src, open(os.path.join(sys.argv[2], name), "wb") as dst:
            dst.write(src.read())
PY
rm -rf "$lib"
mkdir -p "$dir"
mv "$tmp/lib" "$lib"
echo "$wheel_spec" > "$dir/version"
