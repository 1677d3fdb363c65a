#!/usr/bin/env bash
# `make device-check`: packs what the GPU machine needs for the device check into one
# folder (and a tarball of it), for a machine with no Swift toolchain and no network:
#   dist/device-check/mbq-VERSION-linux-x86_64.tar.xz   the `make dist` bundle
#   dist/device-check/Scripts/device-run.sh             the check (its header says what it runs)
#   dist/device-check/Scripts/bench_torch_block.py, Scripts/reference/*.py   PyTorch's side of the bench
#   dist/device-check/fixtures/ARCH/{model,calib.safetensors}   the seven families' test models
# Run it there:  bash Scripts/device-run.sh mbq-*.tar.xz fixtures OUT   (under 6 minutes on an
# H100: OUT/device-check.json). With MBQ_CHECK_DEVICE=cuda-emulated it runs here, on the
# emulated device, which is how this packing is checked without a GPU.
# Usage: Scripts/device-check.sh VERSION   (after `make dist`)
set -euo pipefail
version=${1:?usage: device-check.sh VERSION}
bundle=dist/mbq-$version-linux-x86_64.tar.xz
[ -f "$bundle" ] || { echo "device-check: $bundle is missing: run make dist" >&2; exit 1; }
pack=dist/device-check
rm -rf "$pack.tmp" && mkdir -p "$pack.tmp/Scripts/reference" "$pack.tmp/fixtures"
cp "$bundle" "$pack.tmp/"
cp Scripts/device-run.sh Scripts/bench_torch_block.py "$pack.tmp/Scripts/"
cp Scripts/reference/*.py "$pack.tmp/Scripts/reference/"
for arch in llava15 onevision onevision_mha qwen2vl qwen2_5_vl internvl internvl2; do
  mkdir -p "$pack.tmp/fixtures/$arch"
  cp -r "Tests/MBQModelTests/Fixtures/$arch/model" "Tests/MBQModelTests/Fixtures/$arch/calib.safetensors" "$pack.tmp/fixtures/$arch/"
done
rm -rf "$pack" && mv "$pack.tmp" "$pack"
tar -C dist -cf "dist/mbq-device-check-$version.tar" device-check
echo "dist/mbq-device-check-$version.tar ($(du -h "dist/mbq-device-check-$version.tar" | cut -f1)): on the GPU machine,"
echo "  tar xf mbq-device-check-$version.tar && cd device-check && bash Scripts/device-run.sh mbq-$version-linux-x86_64.tar.xz fixtures OUT"
