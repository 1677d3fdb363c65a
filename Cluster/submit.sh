#!/usr/bin/env bash
# Submits Cluster/mbq.sbatch with --nodes and --time from `mbq plan` (the predicted time
# times 1.5 plus 30 minutes), so the job is not killed before it ends.
#   Cluster/submit.sh WORKERS MODEL CALIB OUT [quantize options]
# MBQ_WORKER_MEMORY (64GiB) and MBQ_WORKER_GFLOPS (the workers' GEMM rate for the
# prediction, default 200) describe the workers (they spill to MBQ_SCRATCH); other sbatch
# options go in SBATCH_* variables.
set -euo pipefail
[ $# -ge 4 ] || { sed -n '2,8p' "$0" >&2; exit 2; }
workers=$1; model=$2; calib=$3; out=$4; shift 4
MBQ=${MBQ:-mbq}
limit=$("$MBQ" plan --model "$model" --calib "$calib" --workers "${workers}x${MBQ_WORKER_MEMORY:-64GiB}@${MBQ_WORKER_GFLOPS:-200}" \
        --scratch --slurm-time)
echo "submit: $workers worker(s) + 1 coordinator node, time limit $limit (mbq plan)"
exec sbatch --nodes=$((workers + 1)) --time="$limit" "$(dirname "$0")/mbq.sbatch" "$model" "$calib" "$out" "$@"
