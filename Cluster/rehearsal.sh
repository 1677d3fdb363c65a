#!/usr/bin/env bash
# A multi-host rehearsal on one machine: three network namespaces (one coordinator
# host, two worker hosts) joined by veth pairs to a bridge in a fourth, with their own
# addresses (10.211.0.0/24, only inside these namespaces). Runs a whole job across them
# with a shared secret and checks the output against a single-process run.
#   sudo Cluster/rehearsal.sh [path/to/mbq]      (needs root and `ip netns`)
# Exits 77 (skipped) when it cannot build namespaces.
set -euo pipefail
mbq=$(readlink -f "${1:-.build/debug/mbq}")
here=$(cd "$(dirname "$0")/.." && pwd)
fx="$here/Tests/MBQModelTests/Fixtures/onevision_mha"
if [ "$(id -u)" != 0 ] || ! command -v ip >/dev/null || ! ip netns add mbq-probe 2>/dev/null; then
  echo "rehearsal skipped: needs root and ip netns"; exit 77
fi
ip netns del mbq-probe
work=$(mktemp -d)
hosts=(mbq-coord mbq-w1 mbq-w2)
cleanup() {
  for h in "${hosts[@]}" mbq-switch; do ip netns pids "$h" 2>/dev/null | xargs -r kill -9 2>/dev/null || true; ip netns del "$h" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
# Namespaces left by an interrupted earlier run go first.
for h in "${hosts[@]}" mbq-switch; do ip netns del "$h" 2>/dev/null || true; done
ip netns add mbq-switch
ip -n mbq-switch link add br0 type bridge
ip -n mbq-switch link set br0 up
for i in 0 1 2; do
  h=${hosts[$i]}
  ip netns add "$h"
  ip link add "veth$i" type veth peer name "port$i"
  ip link set "veth$i" netns "$h"
  ip link set "port$i" netns mbq-switch
  ip -n mbq-switch link set "port$i" master br0 up
  ip -n "$h" addr add "10.211.0.$((i + 1))/24" dev "veth$i"
  ip -n "$h" link set "veth$i" up
  ip -n "$h" link set lo up
done
export MBQ_KEEP_BLAS_ENV=1 MBQ_SECRET=rehearsal-secret
"$mbq" quantize --model "$fx/model" --calib "$fx/calib.safetensors" --w-bit 3 --out "$work/ref" 2>/dev/null
ip netns exec mbq-coord "$mbq" coordinator --model "$fx/model" --calib "$fx/calib.safetensors" --w-bit 3 \
   --out "$work/out" --bind tcp://10.211.0.1:5555 --workers 2 --log-format json 2> "$work/coord.log" &
coord=$!
# The worker hosts do not share the coordinator's disk: $work (where the output goes) is
# an empty tmpfs in their mount namespaces, so they stream their blocks to the coordinator.
for i in 1 2; do
  ip netns exec "${hosts[$i]}" unshare --mount sh -c "mount -t tmpfs none '$work' && exec '$mbq' worker \
     --connect tcp://10.211.0.1:5555 --id host$i --data-bind 'tcp://10.211.0.$((i + 1)):*' --threads 1" 2> "$work/w$i.log" &
done
if ! timeout 120 tail --pid=$coord -f /dev/null; then echo "rehearsal: job did not finish"; cat "$work/coord.log"; exit 1; fi
wait $coord
# The coordinator's events (one JSON object per line; docs/DESIGN.md §3.4): the plans, and
# the end of the job with where the blocks came from.
python3 - "$work/coord.log" <<'PY' || { echo "rehearsal: workers without the output directory did not stream their blocks"; exit 1; }
import json, sys
events = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
for e in events:
    if e["event"] in ("planned", "job_done"):
        print({k: v for k, v in e.items() if k not in ("t", "phase")})
done = [e for e in events if e["event"] == "job_done"]
sys.exit(0 if done and done[-1]["written_by_workers"] == 0 and done[-1]["streamed"] == 3 else 1)
PY
[ "$(ls "$work/ref")" = "$(ls "$work/out")" ] || { echo "rehearsal: the output's files differ from the single-process run"; exit 1; }
for f in $(ls "$work/ref"); do
  case "$f" in mbq_results.json|report.md) continue ;; esac   # these record timings
  cmp "$work/ref/$f" "$work/out/$f" || { echo "rehearsal: $f differs from the single-process run"; exit 1; }
done
echo "rehearsal passed: 3 hosts (10.211.0.1-3), workers without the coordinator's disk streamed their blocks, output identical to the single-process run"
