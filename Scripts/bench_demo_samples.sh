#!/bin/bash
# Held-out caption accuracy of mbq W3 g128 on the demo VLM with fewer calibration samples.
# `make release` first. Prints the held-out caption-token accuracy (mean and range over the
# three calibration bundles) and the caption KL to the fp model for each sample count.
#   Scripts/bench_demo_samples.sh [WORKDIR]
cd "$(dirname "$0")/.."; B=${MBQ:-.build/release/mbq}; D=Demo; W=${1:-/tmp/mbq-samples-sweep}; rm -rf $W; mkdir -p $W
$B eval --model $D/model --calib $D/heldout.safetensors --json > $W/fp.json 2>/dev/null
for n in 2 4 8 16 32; do for s in 0 1 2; do
  $B quantize --model $D/model --calib $D/calib-seed$s.safetensors --method mbq --w-bit 3 --samples $n --out $W/q-$n-$s 2>/dev/null
  $B eval --model $W/q-$n-$s --calib $D/heldout.safetensors --reference $D/model --json > $W/e-$n-$s.json 2>/dev/null
  rm -rf $W/q-$n-$s
done; done
python3 - "$W" <<'PY'
import json
import sys; W=sys.argv[1]
fp=json.load(open(f"{W}/fp.json"))
print("fp", round(100*fp["caption_accuracy"],2))
for n in (2,4,8,16,32):
    acc=[100*json.load(open(f"{W}/e-{n}-{s}.json"))["caption_accuracy"] for s in (0,1,2)]
    kl=[json.load(open(f"{W}/e-{n}-{s}.json"))["kl_caption"] for s in (0,1,2)]
    print(n, "%.2f (%.2f-%.2f)" % (sum(acc)/3, min(acc), max(acc)), "KL %.4f (%.4f-%.4f)" % (sum(kl)/3, min(kl), max(kl)))
PY
