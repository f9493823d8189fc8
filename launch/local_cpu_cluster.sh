#!/usr/bin/env bash
# Emulates a multi-host job on one machine: N processes x D CPU devices each, coordinated over
# 127.0.0.1 with gloo collectives, exactly as jax.distributed runs on a TPU pod.
#   launch/local_cpu_cluster.sh [-n PROCESSES] [-d DEVICES_PER_PROCESS] -- COMMAND ARGS...
# e.g. launch/local_cpu_cluster.sh -n 2 -d 4 -- opsd-jax convert --from-hf hf/ --to-orbax ck/ --mesh 2,4,1
# A SIGTERM or SIGINT sent to this script goes to every process (a whole-job preemption; `kill
# -TERM PID` of one process preempts only that host, as on a pod). Each process's exit code is
# reported on stderr ("[cluster] process R exited with code C"); the script exits with the last
# non-zero one (so 42, the trainer's restart code, when every process was preempted), else 0.
set -euo pipefail
processes=2
devices=4
port=$(( 20000 + RANDOM % 20000 ))
while [ $# -gt 0 ]; do
  case "$1" in
    -n) processes=$2; shift 2 ;;
    -d) devices=$2; shift 2 ;;
    -p) port=$2; shift 2 ;;
    --) shift; break ;;
    *) echo "unknown option $1 (usage: $0 [-n N] [-d D] [-p PORT] -- COMMAND...)" >&2; exit 2 ;;
  esac
done
[ $# -gt 0 ] || { echo "no command given (usage: $0 [-n N] [-d D] -- COMMAND...)" >&2; exit 2; }
# Line by line as they come (sed would hold its output back in blocks when piped), so a
# process's output reaches the reader while it runs: a server's URL, a trainer's step.
prefix_lines() {
  local line
  while IFS= read -r line || [ -n "$line" ]; do printf '%s%s\n' "$1" "$line"; done
}
pids=()
for ((rank = 0; rank < processes; rank++)); do
  OPSD_COORDINATOR="127.0.0.1:${port}" OPSD_NUM_PROCESSES="$processes" OPSD_PROCESS_ID="$rank" \
  JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=${devices}" \
    "$@" > >(prefix_lines "[process $rank] ") 2>&1 &
  pids+=($!)
done
forward() { kill -s "$1" "${pids[@]}" 2>/dev/null || true; }
trap 'forward TERM' TERM
trap 'forward INT' INT
status=0
for rank in "${!pids[@]}"; do
  pid=${pids[$rank]}
  while true; do
    code=0
    wait "$pid" || code=$?
    # A trapped signal interrupts `wait` (code > 128) while the process still runs: wait again.
    kill -0 "$pid" 2>/dev/null || break
  done
  echo "[cluster] process $rank exited with code $code" >&2
  [ "$code" -eq 0 ] || status=$code
done
exit "$status"
