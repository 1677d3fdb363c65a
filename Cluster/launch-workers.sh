#!/usr/bin/env bash
# Starts one `mbq worker` per line of a hosts file over ssh (see hosts.example).
#   MBQ_SECRET=... Cluster/launch-workers.sh HOSTS tcp://COORDINATOR-IP:5555
# Each worker binds its data socket on the host's data-ip; logs go to ~/mbq-worker-NAME.log
# on that host. Stop them with: Cluster/launch-workers.sh HOSTS --stop
set -euo pipefail
hosts=${1:?usage: launch-workers.sh HOSTS tcp://COORD:PORT | --stop}
target=${2:?usage: launch-workers.sh HOSTS tcp://COORD:PORT | --stop}
grep -v '^\s*#' "$hosts" | grep -v '^\s*$' | while read -r name ssh threads mem ip scratch mbq; do
  mbq=${mbq:-mbq}
  spill=""
  if [ -n "${scratch:-}" ] && [ "$scratch" != "-" ]; then spill="--scratch $scratch"; fi
  if [ "$target" = "--stop" ]; then
    ssh -n "$ssh" "pkill -f 'mbq worker --connect' || true"
    echo "$name: stopped"
    continue
  fi
  ssh -n "$ssh" "MBQ_SECRET='${MBQ_SECRET:-}' nohup $mbq worker --connect $target --id $name --threads $threads \
      --max-memory $mem $spill --data-bind tcp://$ip:* > ~/mbq-worker-$name.log 2>&1 &"
  echo "$name: worker started ($ssh, $threads threads, $mem${spill:+, $spill})"
done
