#!/usr/bin/env bash
# The device check, on a machine with an NVIDIA GPU (issue 25; `make device-check` packs
# it): the `make dist` bundle's mbq, with no Swift toolchain, against the bundle's own CPU
# backend. In order, each step's output kept under OUT:
#   1. where libcuda, cuBLAS and NVRTC are (ldconfig, the nvidia-* wheels of python3);
#   2. `mbq device`: NVRTC compiles the kernels for this GPU (registers, spills), then the
#      per-op conformance on the GPU, and the layer-step conformance (BackendConformance)
#      on three fixture models;
#   3. parity in strict precision: `mbq quantize --device cuda` and `--device cpu` on every
#      family's fixture (MBQ W4 g128), the grid point of every group compared;
#   4. a 2-worker job, one worker on the GPU and one on the CPU, compared byte for byte
#      with the one-process CPU output;
#   5. `mbq bench --device cuda` on a Llama-7B-shaped block (1024 tokens: forward,
#      forward+backward, the MBQ W4 g128 search) next to the authors' search in PyTorch on
#      the same GPU (Scripts/reference/mbq_reference.py), when python3 has torch.
# Then OUT/device-check.json gathers them. MBQ_CHECK_DEVICE=cuda-emulated runs the same
# steps on the emulated device (how this script is tested without a GPU).
# Usage: Scripts/device-run.sh BUNDLE.tar.xz FIXTURES-DIR OUT
set -uo pipefail
bundle=$(realpath "${1:?usage: device-run.sh BUNDLE.tar.xz FIXTURES-DIR OUT}")
fixtures=$(realpath "${2:?fixtures dir}")
out=$(realpath -m "${3:?out dir}")
dev=${MBQ_CHECK_DEVICE:-cuda}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tar -C "$work" -xJf "$bundle"
mbq=$(echo "$work"/mbq-*/mbq)
start=$(date +%s)
step() { echo "== [$(( $(date +%s) - start )) s] $*"; }

step "1. libraries"
{
  ldconfig -p 2>/dev/null | grep -E 'libcuda\.so|libcublas|libnvrtc' || echo "(ldconfig lists none)"
  python3 - <<'PY' 2>/dev/null || true
import glob, site
for d in site.getsitepackages() + [site.getusersitepackages()]:
    for lib in sorted(glob.glob(d + "/nvidia/*/lib/lib*.so*")):
        if any(k in lib for k in ("cublas", "nvrtc", "cudart")):
            print(lib)
PY
} > "$out/libraries.txt"
cat "$out/libraries.txt"
# The wheels' folders for mbq's search (CUDALibraries), unless the caller set them.
if [ -z "${MBQ_CUDA_LIBS:-}" ]; then
  MBQ_CUDA_LIBS=$(grep -E '/nvidia/[^/]+/lib/' "$out/libraries.txt" | xargs -r -n1 dirname | sort -u | paste -sd: -)
  export MBQ_CUDA_LIBS
fi
echo "MBQ_CUDA_LIBS=${MBQ_CUDA_LIBS:-}"

step "2. per-op and layer-step conformance on $dev"
"$mbq" device --device "$dev" --json "$out/ops.json" > "$out/ops.txt" 2>&1; ops_rc=$?
tail -3 "$out/ops.txt"
layers_rc=0
for arch in llava15 onevision_mha qwen2vl; do
  "$mbq" device --device "$dev" --model "$fixtures/$arch/model" --calib "$fixtures/$arch/calib.safetensors" \
    --json "$out/layers-$arch.json" > "$out/layers-$arch.txt" 2>&1 || layers_rc=1
  tail -1 "$out/layers-$arch.txt"
done

step "3. parity: every family, MBQ W4 g128, $dev against the CPU"
parity_rc=0
for arch in llava15 onevision onevision_mha qwen2vl qwen2_5_vl internvl internvl2; do
  for d in cpu "$dev"; do
    "$mbq" quantize --model "$fixtures/$arch/model" --calib "$fixtures/$arch/calib.safetensors" --w-bit 4 --group 128 \
      --device "$d" --out "$work/parity-$arch-$d" > "$out/parity-$arch-$d.log" 2>&1 || parity_rc=1
  done
done
python3 - "$work" "$dev" > "$out/parity.json" <<'PY' || parity_rc=1
import json, sys, glob, os
work, dev = sys.argv[1], sys.argv[2]
rows, same, total = [], 0, 0
for cpu in sorted(glob.glob(work + "/parity-*-cpu")):
    arch = os.path.basename(cpu)[len("parity-"):-len("-cpu")]
    a = json.load(open(cpu + "/mbq_results.json")); b = json.load(open(f"{work}/parity-{arch}-{dev}/mbq_results.json"))
    ga, gb = a.get("groups", []), b.get("groups", [])
    for x, y in zip(ga, gb):
        total += 1
        i, j = x["best_idx"], y["best_idx"]
        same += i == j
        if i != j:
            # A near-tie when the CPU's own curve puts the two picks within 1e-6 relative.
            tie = abs(x["loss"][i] - x["loss"][j]) / max(abs(x["loss"][i]), 1e-300) < 1e-6
            rows.append({"arch": arch, "layer": x["layer"], "group": x["group"], "cpu": i, "device": j, "near_tie": tie})
    if len(ga) != len(gb):
        rows.append({"arch": arch, "groups_cpu": len(ga), "groups_device": len(gb)})
print(json.dumps({"groups": total, "same_grid_point": same, "different": rows}))
PY
cat "$out/parity.json"; echo

step "4. two workers: $dev and cpu, against one CPU process"
model=$fixtures/onevision_mha/model; calib=$fixtures/onevision_mha/calib.safetensors
"$mbq" quantize --model "$model" --calib "$calib" --w-bit 3 --out "$work/one" > "$out/one.log" 2>&1
export MBQ_SECRET=device-check-$(date +%s%N)
port=$(( 20000 + RANDOM % 20000 ))
"$mbq" coordinator --model "$model" --calib "$calib" --w-bit 3 --out "$work/two" --bind "tcp://127.0.0.1:$port" --workers 2 \
  --job-dir "$work/job" > "$out/coordinator.log" 2>&1 &
coord=$!
"$mbq" worker --connect "tcp://127.0.0.1:$port" --id gpu --device "$dev" > "$out/worker-gpu.log" 2>&1 &
w0=$!
"$mbq" worker --connect "tcp://127.0.0.1:$port" --id cpu --device cpu > "$out/worker-cpu.log" 2>&1 &
w1=$!
( sleep 240; kill $coord $w0 $w1 2>/dev/null ) & guard=$!
wait $coord; mixed_rc=$?
kill $guard $w0 $w1 2>/dev/null
cmp_lines=()
for f in $(cd "$work/one" 2>/dev/null && ls | grep -v -e mbq_results.json -e report.md); do
  if cmp -s "$work/one/$f" "$work/two/$f"; then cmp_lines+=("\"$f\": \"identical\""); else cmp_lines+=("\"$f\": \"DIFFERS\""); mixed_rc=1; fi
done
echo "{$(IFS=,; echo "${cmp_lines[*]}")}" > "$out/mixed-cmp.json"
cat "$out/mixed-cmp.json"

step "5. bench on $dev"
torch_flag=()
if python3 -c "import torch, transformers" 2>/dev/null; then torch_flag=(--torch python3); fi
# mbq bench finds its Python scripts beside the repository it was built from; run it where they are.
(cd "$here/.." && "$mbq" bench --device "$dev" --tokens 1024 --reps 2 "${torch_flag[@]}" --json "$out/bench.json") > "$out/bench.txt" 2>&1
bench_rc=$?
cat "$out/bench.txt"

step "gather"
python3 - "$out" "$ops_rc" "$layers_rc" "$parity_rc" "$mixed_rc" "$bench_rc" "$(( $(date +%s) - start ))" > "$out/device-check.json.tmp" <<'PY'
import json, sys, os
out = sys.argv[1]
def load(name):
    try: return json.load(open(os.path.join(out, name)))
    except Exception as e: return {"missing": str(e)}
layers = {a: load(f"layers-{a}.json") for a in ("llava15", "onevision_mha", "qwen2vl")}
print(json.dumps({"ops": load("ops.json"), "layers": layers, "parity": load("parity.json"), "mixed_workers_cmp": load("mixed-cmp.json"),
                  "bench": load("bench.json"), "libraries": open(os.path.join(out, "libraries.txt")).read().split("\n"),
                  "exit_codes": dict(zip(["ops", "layers", "parity", "mixed", "bench"], map(int, sys.argv[2:7]))),
                  "seconds": int(sys.argv[7])}, indent=1, sort_keys=True))
PY
mv "$out/device-check.json.tmp" "$out/device-check.json"
step "done: $out/device-check.json"
[ $ops_rc -eq 0 ] && [ $layers_rc -eq 0 ] && [ $parity_rc -eq 0 ] && [ $mixed_rc -eq 0 ] && [ $bench_rc -eq 0 ]
