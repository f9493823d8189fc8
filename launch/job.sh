#!/usr/bin/env bash
# One detached job per TPU VM worker: `opsd-jax launch tpu-vm | queued` starts it here, `opsd-jax
# launch logs | status | stop` watch and stop it (opsd_jax/launch/remote_job.py). The job outlives
# the ssh session that started it.
#
#   job.sh check               exit 3 (naming the pid and log) while a job is running here
#   job.sh start COMMAND...    start COMMAND detached from the current directory; refuses like check
#   job.sh follow              the current job's log from its start until it ends; exits with its code
#   job.sh logs LINES [follow] the log's last LINES lines (follow: and on until the job ends)
#   job.sh status              running (pid), exited (code), killed, or no job; the log's last line
#   job.sh stop                SIGTERM to the job: a training run saves and exits 42
#
# Files in $OPSD_JAX_JOB_DIR (default ~/opsd-jax/runs/launch; an install unpacks over the tree and
# keeps runs/): job.log (every job's output, appended, each under a header), job.pid (the
# supervisor), job.exit (the command's exit code, written when it ends), job.offset (the log's size
# when the current job started). The supervisor runs COMMAND as its child, forwards SIGTERM, SIGINT
# and SIGHUP to it and records its exit code whichever signal came; a job without job.exit whose
# supervisor is gone was killed (SIGKILL, the VM restarted). A stale pid is recognised by its
# command line, never trusted.
set -u
dir=${OPSD_JAX_JOB_DIR:-$HOME/opsd-jax/runs/launch}
log=$dir/job.log pidfile=$dir/job.pid exitfile=$dir/job.exit offsetfile=$dir/job.offset
host=${HOSTNAME:-$(uname -n)}
refused=3

alive() {
  [ -s "$pidfile" ] && { tr '\0' ' ' < "/proc/$(cat "$pidfile")/cmdline"; } 2>/dev/null | grep -q 'job\.sh supervise '
}

refuse_if_running() {
  if alive; then
    echo "$host: a job is still running there (pid $(cat "$pidfile"), log $log); stop it first" \
         "(opsd-jax launch stop) or wait for it" >&2
    exit $refused
  fi
}

need_log() {
  [ -f "$log" ] || { echo "$host: no job was started here ($log does not exist)" >&2; exit 1; }
}

now() { date -u +%Y-%m-%dT%H:%M:%SZ; }

action=${1:-}
[ $# -gt 0 ] && shift
case $action in
  check)
    refuse_if_running ;;
  start)
    [ $# -gt 0 ] || { echo "job.sh start: no command" >&2; exit 2; }
    mkdir -p "$dir"
    refuse_if_running
    rm -f "$exitfile"
    touch "$log"
    wc -c < "$log" | tr -d ' ' > "$offsetfile"
    printf -v quoted '%q ' "$@"  # one line, as a shell would take it back
    echo "=== $(now) $host: ${quoted% }" >> "$log"
    setsid nohup bash "$0" supervise "$@" >> "$log" 2>&1 < /dev/null &
    echo $! > "$pidfile"
    echo "$host: started (pid $!), log $log" ;;
  supervise)
    export PYTHONUNBUFFERED=1  # the log is a file: Python would hold prints back in a block buffer
    # The trap is set before the child starts, so a stop that comes first is passed on, not lost.
    child= stopping=
    trap 'stopping=1; [ -n "$child" ] && kill -TERM "$child" 2>/dev/null' TERM INT HUP
    "$@" < /dev/null &
    child=$!
    [ -n "$stopping" ] && kill -TERM "$child" 2>/dev/null
    # wait returns early (above 128) when a trapped signal arrives: wait again until the child is gone.
    status=0
    while kill -0 $child 2>/dev/null; do wait $child; status=$?; done
    echo "=== $(now) exit $status"
    echo $status > "$exitfile.tmp" && mv "$exitfile.tmp" "$exitfile"
    exit $status ;;
  follow)
    need_log
    offset=$(cat "$offsetfile" 2>/dev/null || echo 0)
    if alive; then tail -c +$((offset + 1)) --pid="$(cat "$pidfile")" -f "$log"; else tail -c +$((offset + 1)) "$log"; fi
    [ -f "$exitfile" ] && exit "$(cat "$exitfile")"
    echo "$host: the job ended without an exit code (killed, or the VM restarted)" >&2
    exit 1 ;;
  logs)
    lines=${1:-50}
    case $lines in ''|*[!0-9]*) echo "job.sh logs: LINES must be a number, got '$lines'" >&2; exit 2 ;; esac
    need_log
    if [ "${2:-}" = follow ] && alive; then exec tail -n "$lines" --pid="$(cat "$pidfile")" -f "$log"; fi
    tail -n "$lines" "$log" ;;
  status)
    if alive; then state="running (pid $(cat "$pidfile"))"
    elif [ -f "$exitfile" ]; then state="exited with $(cat "$exitfile")"
    elif [ -f "$pidfile" ]; then state="ended without an exit code (killed, or the VM restarted)"
    else state="no job"; fi
    last=$(tail -n 1 "$log" 2>/dev/null || true)
    echo "$host: $state${last:+ | $last}" ;;
  stop)
    if alive; then
      kill -TERM "$(cat "$pidfile")" && echo "$host: sent SIGTERM to the job (pid $(cat "$pidfile"))"
    else
      echo "$host: no job running"
    fi ;;
  *)
    echo "usage: job.sh check | start COMMAND... | follow | logs LINES [follow] | status | stop" >&2
    exit 2 ;;
esac
