#!/usr/bin/env bash
# `make cluster-test`: a real Slurm on this machine (Debian's slurm-wlm and munge; four
# node entries on one host, ../shared/SLURM.md), then Cluster/submit.sh runs
# Cluster/mbq.sbatch end to end: a coordinator step and 3 worker steps on a test model,
# the output compared byte for byte with one process. Needs root; exits 77 (skipped)
# without it. Everything it starts it stops by pid.
#   Cluster/slurm-test.sh [path/to/mbq]
set -euo pipefail
mbq=$(readlink -f "${1:-.build/release/mbq}")
here=$(cd "$(dirname "$0")/.." && pwd)
fx="$here/Tests/MBQModelTests/Fixtures/onevision_mha"
[ "$(id -u)" = 0 ] || { echo "cluster-test skipped: needs root (it starts munge and Slurm daemons)"; exit 77; }
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi
work=$(mktemp -d /tmp/mbq-slurm.XXXXXX)
chmod 755 "$work"
pids=()
cleanup() {
  for f in "$work"/run/*.pid; do [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true; done
  [ -n "${munge_pid:-}" ] && kill "$munge_pid" 2>/dev/null || true
  sleep 1; rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/run" "$work/state" "$work/log" "$work/spool"/n{1,2,3,4}
# munge: reuse a running one, else start one as its user.
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  [ -f /etc/munge/munge.key ] || { mungekey --create 2>/dev/null || /usr/sbin/create-munge-key -f; }
  mkdir -p /run/munge && chown munge:munge /run/munge
  su -s /bin/sh munge -c "/usr/sbin/munged --pid-file=$work/run/munged.pid" 2>/dev/null || su -s /bin/sh munge -c /usr/sbin/munged
  sleep 1
  munge_pid=$(cat "$work/run/munged.pid" 2>/dev/null || pgrep -u munge -n munged || true)
fi
munge -n | unmunge >/dev/null || { echo "cluster-test: munge does not work"; exit 1; }
h=$(hostname -s)
base=$((17000 + RANDOM % 20000))
export SLURM_CONF="$work/slurm.conf"
cat > "$SLURM_CONF" <<CONF
ClusterName=mbqtest
SlurmctldHost=$h
SlurmctldPort=$base
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$work/state
SlurmdSpoolDir=$work/spool/%n
SlurmctldPidFile=$work/run/slurmctld.pid
SlurmdPidFile=$work/run/slurmd-%n.pid
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SlurmctldLogFile=$work/log/slurmctld.log
SlurmdLogFile=$work/log/slurmd-%n.log
NodeName=n[1-4] NodeHostname=$h NodeAddr=127.0.0.1 Port=$((base + 1))-$((base + 4)) CPUs=2 RealMemory=4000 State=UNKNOWN
PartitionName=main Nodes=n[1-4] Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
slurmctld -f "$SLURM_CONF"
for n in n1 n2 n3 n4; do slurmd -f "$SLURM_CONF" -N "$n"; done
for _ in $(seq 60); do [ "$(sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | wc -l)" = 4 ] && break; sleep 1; done
sinfo -N
export MBQ_KEEP_BLAS_ENV=1
"$mbq" quantize --model "$fx/model" --calib "$fx/calib.safetensors" --w-bit 3 --out "$work/ref" 2>/dev/null
# The sbatch as a user runs it: 3 workers, the time limit from mbq plan, the job's output
# on the shared disk.
cd "$work"
submitted=$(MBQ="$mbq" MBQ_WORKER_MEMORY=2GiB MBQ_SCRATCH="$work" MBQ_WORKER_GFLOPS=20 \
  "$here/Cluster/submit.sh" 3 "$fx/model" "$fx/calib.safetensors" "$work/out" --w-bit 3 --log-format json)
echo "$submitted"
job=$(echo "$submitted" | sed -n 's/^Submitted batch job \([0-9]*\).*/\1/p')
[ -n "$job" ] || { echo "cluster-test: sbatch did not submit"; exit 1; }
for _ in $(seq 300); do
  state=$(scontrol show job "$job" 2>/dev/null | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p')
  case "$state" in COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY) break ;; esac
  sleep 1
done
echo "slurm job $job: $state"
cat "$work/slurm-$job.out" | grep -v '^{' || true
python3 - "$work/slurm-$job.out" <<'PY'
import json, sys
for l in open(sys.argv[1]):
    if l.startswith("{"):
        e = json.loads(l)
        if e["event"] in ("worker_registered", "planned", "job_done"):
            print({k: v for k, v in e.items() if k in ("event", "worker", "host", "plan", "reason", "layers", "streamed", "written_by_workers")})
PY
[ "$state" = COMPLETED ] || { echo "cluster-test: the job ended $state"; tail -20 "$work/log/slurmctld.log"; exit 1; }
[ "$(ls "$work/ref")" = "$(ls "$work/out")" ] || { echo "cluster-test: the output's files differ from one process's"; exit 1; }
for f in $(ls "$work/ref"); do
  case "$f" in mbq_results.json|report.md) continue ;; esac
  cmp "$work/ref/$f" "$work/out/$f" || { echo "cluster-test: $f differs from one process's"; exit 1; }
  echo "cmp $f: identical"
done
echo "cluster-test passed: Slurm job $job, 3 worker steps, output identical to one process"
