#!/usr/bin/env bash
# Starts one `mbq worker` per line of a hosts file over ssh (see hosts.example) and waits
# until each one has registered with the coordinator, or reports why it did not.
#
#   Cluster/launch-workers.sh HOSTS tcp://COORDINATOR-IP:5555 [--secret-file FILE] [--copy PATH]... [--wait SECONDS]
#   Cluster/launch-workers.sh HOSTS --stop
#
# Secret: --secret-file FILE (or MBQ_SECRET) is sent to each host over ssh's standard
#   input into ~/.mbq/secret (mode 600) and the worker reads it from there: it is never on
#   a command line. Without one the workers join without authentication (loopback only).
# --copy PATH: copies PATH (a file or directory: the mbq binary or bundle, the checkpoint,
#   the calibration bundle) to the same absolute path on every host that lacks it.
# Logs: ~/mbq-worker-NAME.log on each host; pid: ~/.mbq/worker-NAME.pid; exit status:
#   ~/.mbq/worker-NAME.exit. --stop stops exactly the processes of those pid files.
# SSH and SCP name the commands to use (default ssh, scp).
set -euo pipefail
usage() { sed -n '2,16p' "$0" >&2; exit 2; }
[ $# -ge 2 ] || usage
hosts=$1; target=$2; shift 2
secret_file=""; copies=(); wait_s=120
while [ $# -gt 0 ]; do
  case "$1" in
    --secret-file) secret_file=${2:?}; shift 2 ;;
    --copy) copies+=("$(readlink -f "${2:?}")"); shift 2 ;;
    --wait) wait_s=${2:?}; shift 2 ;;
    *) usage ;;
  esac
done
SSH=${SSH:-ssh}; SCP=${SCP:-scp}
[ -r "$hosts" ] || { echo "launch-workers: cannot read hosts file $hosts" >&2; exit 2; }
secret=""
if [ -n "$secret_file" ]; then secret=$(cat "$secret_file"); elif [ -n "${MBQ_SECRET:-}" ]; then secret=$MBQ_SECRET; fi
if [ "$target" != "--stop" ] && [ -n "$secret" ] && [ ${#secret} -lt 16 ]; then
  echo "launch-workers: the secret has ${#secret} bytes; at least 16 are required (mbq keygen makes one)" >&2; exit 2
fi
lines=$(grep -v '^\s*#' "$hosts" | grep -v '^\s*$' || true)
[ -n "$lines" ] || { echo "launch-workers: no hosts in $hosts" >&2; exit 2; }

if [ "$target" = "--stop" ]; then
  while read -r name ssh _; do
    # Only the process group this script started, and only while it is still an mbq worker.
    $SSH -n "$ssh" "f=~/.mbq/worker-$name.pid; if [ -f \$f ] && p=\$(cat \$f) && grep -q 'mbq.*worker' /proc/\$p/cmdline 2>/dev/null; then kill -TERM -\$p 2>/dev/null || kill -TERM \$p; rm -f \$f; echo stopped; else rm -f \$f; echo 'not running'; fi" |
      sed "s/^/$name: /"
  done <<< "$lines"
  exit 0
fi

started=()
while read -r name ssh threads mem ip scratch mbq; do
  mbq=${mbq:-mbq}
  spill=""
  if [ -n "${scratch:-}" ] && [ "$scratch" != "-" ]; then spill="--scratch $scratch"; fi
  for p in "${copies[@]}"; do
    # Never over what is there: a host that shares this disk (or this machine itself)
    # would have scp truncate the very file it reads.
    if $SSH -n "$ssh" "test -e '$p'"; then
      echo "$name: $p is already there, not copied (remove it on $ssh to copy it again)"
      continue
    fi
    $SSH -n "$ssh" "mkdir -p '$(dirname "$p")'"
    $SCP -q -r "$p" "$ssh:$(dirname "$p")/"
  done
  auth=""
  if [ -n "$secret" ]; then
    printf '%s\n' "$secret" | $SSH "$ssh" 'umask 077; mkdir -p ~/.mbq && cat > ~/.mbq/secret'
    auth="--secret-file ~/.mbq/secret"
  fi
  # setsid: the worker leads its own process group (the pid file holds it), and ssh
  # returns at once; the wrapper records the worker's exit status.
  $SSH -n "$ssh" "mkdir -p ~/.mbq; rm -f ~/.mbq/worker-$name.exit; cd ~; \
      setsid sh -c '$mbq worker --connect $target --id $name --threads $threads --max-memory $mem $spill $auth \
      --data-bind \"tcp://$ip:*\" > ~/mbq-worker-$name.log 2>&1; echo \$? > ~/.mbq/worker-$name.exit' < /dev/null > /dev/null 2>&1 & \
      echo \$! > ~/.mbq/worker-$name.pid"
  started+=("$name $ssh")
  echo "$name: started on $ssh ($threads threads, $mem${spill:+, $spill}), waiting for it to register"
done <<< "$lines"

# Each worker: registered (its log says so), or exited (its status and log tail), or
# still silent after --wait seconds.
failed=0
for entry in "${started[@]}"; do
  read -r name ssh <<< "$entry"
  deadline=$((SECONDS + wait_s)); state=""
  while [ $SECONDS -lt $deadline ]; do
    state=$($SSH -n "$ssh" "if grep -q 'registered with the coordinator' ~/mbq-worker-$name.log 2>/dev/null; then echo registered; \
        elif [ -f ~/.mbq/worker-$name.exit ]; then echo exited \$(cat ~/.mbq/worker-$name.exit); fi")
    [ -n "$state" ] && break
    sleep 1
  done
  case "$state" in
    registered) echo "$name: registered" ;;
    exited*) failed=1; echo "$name: FAILED: the worker exited with status ${state#exited }; the end of ~/mbq-worker-$name.log on $ssh:"
             $SSH -n "$ssh" "tail -n 5 ~/mbq-worker-$name.log" | sed 's/^/    /' ;;
    *) failed=1; echo "$name: FAILED: not registered after $wait_s s (is the coordinator at $target reachable?); the end of its log:"
       $SSH -n "$ssh" "tail -n 5 ~/mbq-worker-$name.log" | sed 's/^/    /' ;;
  esac
done
exit $failed
