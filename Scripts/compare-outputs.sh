#!/usr/bin/env bash
# Runs the same quantize jobs with two mbq binaries and compares every output file byte
# for byte (cmp), for refactors that must change no result (docs/BENCHMARKS.md, "Refactors
# that change no result"). Usage: Scripts/compare-outputs.sh OLD_MBQ NEW_MBQ [NEW-WORKDIR]
# Jobs: the demo VLM (Demo/) with calibration seed 0, in one process, one per option set
# below, and `mbq eval --json` of each output on the held-out bundle against the fp model;
# the first three option sets and the eighth (GPTQ) again with 1, 2 and 3 local workers (new binary only,
# compared with the old one-process output). Every file of each output is
# compared except mbq_results.json and report.md, which hold run times; what they
# report (scales, grid points) is folded into the shards compared.
set -euo pipefail
old=$(realpath "$1"); new=$(realpath "$2")
# A fresh folder: never one that exists (nothing of the user's is removed or mixed in).
if [ -n "${3:-}" ]; then
  [ ! -e "$3" ] || { echo "compare-outputs: $3 exists; give a folder that does not" >&2; exit 2; }
  work=$3; mkdir -p "$work"
else
  work=$(mktemp -d /tmp/mbq-compare.XXXXXX)
fi
echo "outputs under $work"
model=Demo/model; calib=Demo/calib-seed0.safetensors
sets=(
  "--method mbq --w-bit 3 --group 128"
  "--method awq --w-bit 4 --group 64 --format gptq"
  "--method mbq --w-bit 4 --group 128 --a-bit 8"
  "--method smoothquant --w-bit 8 --a-bit 8"
  "--method rtn --w-bit 4 --group 128 --format awq"
  "--method mbq --w-bit 4 --group 128 --distort --loss mse"
  "--method gptq --w-bit 3 --group 64 --act-order --format gptq"
  "--method mbq --then gptq --hessian-weights modality --w-bit 2 --group 64"
  "--method awq --then gptq --hessian-weights gradient --w-bit 4 --group 128 --format fake"
)
fail=0
# Every file of the output but mbq_results.json and report.md (they hold timings).
compare() {  # DIR_A DIR_B LABEL
  local a=$1 b=$2 label=$3 n=0
  while IFS= read -r f; do
    case "$f" in */mbq_results.json|*/report.md) continue;; esac
    n=$((n+1))
    if ! cmp -s "$a/$f" "$b/$f"; then echo "DIFFER  $label: $f"; fail=1; fi
  done < <(cd "$a" && find . -type f | sort)
  [ "$(cd "$a" && find . -type f | sort)" = "$(cd "$b" && find . -type f | sort)" ] || { echo "DIFFER  $label: file lists"; fail=1; }
  echo "compared $label: $n files"
}
i=0
for s in "${sets[@]}"; do
  i=$((i+1))
  "$old" quantize --model $model --calib $calib --out "$work/old-$i" $s >/dev/null 2>"$work/old-$i.log"
  "$new" quantize --model $model --calib $calib --out "$work/new-$i" $s >/dev/null 2>"$work/new-$i.log"
  compare "$work/old-$i" "$work/new-$i" "set $i ($s)"
  # The evaluation of the output (caption CE, accuracy, KL to the fp model), printed by each binary.
  "$old" eval --model "$work/old-$i" --calib Demo/heldout.safetensors --reference $model --json >"$work/old-$i.eval" 2>/dev/null
  "$new" eval --model "$work/new-$i" --calib Demo/heldout.safetensors --reference $model --json >"$work/new-$i.eval" 2>/dev/null
  if cmp -s "$work/old-$i.eval" "$work/new-$i.eval"; then echo "compared set $i: mbq eval output identical"; else echo "DIFFER  set $i: mbq eval"; fail=1; fi
  if [ $i -le 3 ] || [ $i = 8 ]; then
    for w in 1 2 3; do
      "$new" quantize --model $model --calib $calib --out "$work/new-$i-w$w" --workers $w $s >/dev/null 2>"$work/new-$i-w$w.log"
      compare "$work/old-$i" "$work/new-$i-w$w" "set $i, $w workers"
    done
  fi
done
[ $fail = 0 ] && echo "all outputs byte-identical" || { echo "outputs differ"; exit 1; }
