"""The commands that start, follow, inspect and stop one detached job on every TPU VM worker: each
runs `launch/job.sh` (shipped in the tree the launcher installs) through `tpu-vm ssh`.

A detached job outlives the ssh session that started it; its output goes to
~/opsd-jax/runs/launch/job.log on each worker, its exit code to job.exit (the script says how).
"""

from __future__ import annotations

import shlex

SCRIPT = "$HOME/opsd-jax/launch/job.sh"  # the installed tree's copy (tpu_vm.REMOTE_DIR)
REFUSED_CODE = 3  # job.sh: a job is still running where a new one would start


def _job(*words: str) -> str:
    return f"bash {SCRIPT} " + shlex.join(words)


def check_idle() -> str:
    """Fails (exit 3, naming the worker, pid and log) where a job is still running; passes where the
    tree was never installed (no job can be running there)."""
    return f"if [ -f {SCRIPT} ]; then {_job('check')}; fi"


def start(workdir: str, environment: dict[str, str], argv: list[str]) -> str:
    """Starts `argv` detached from `workdir` with `environment` added ($VAR in a value expands on the
    worker) and returns at once; refuses (exit 3) where a job is still running."""
    if not argv:
        raise ValueError("no command to run (give it after --, e.g. -- opsd-jax train --config configs/X.yaml)")
    # `env` execs the command in place, so the supervisor's child, which gets the signals, is the command.
    assignments = " ".join(f"{name}={value}" for name, value in environment.items())
    return f"cd {workdir} && bash {SCRIPT} start env {assignments} {shlex.join(argv)}"


def follow() -> str:
    """The current job's log from its start until it ends; exits with the job's code (1 when none
    was recorded). Interrupting it leaves the job running."""
    return _job("follow")


def show_log(lines: int, *, follow_while_running: bool = False) -> str:
    if lines < 0:
        raise ValueError(f"--lines must be >= 0, got {lines}")
    return _job("logs", str(lines), *(["follow"] if follow_while_running else []))


def status() -> str:
    return _job("status")


def stop() -> str:
    """SIGTERM to the job (its supervisor forwards it): a training run saves and exits 42."""
    return _job("stop")


__all__ = ["REFUSED_CODE", "SCRIPT", "check_idle", "follow", "show_log", "start", "status", "stop"]
