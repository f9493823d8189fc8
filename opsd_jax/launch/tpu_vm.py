"""Cloud TPU VM slices, created directly or through a queued resource: create, install the
project on every worker, run one command on every worker.

    opsd-jax launch tpu-vm --name N --zone Z --topology v5p-64 [--create] [--spot] -- opsd-jax train --config C
    opsd-jax launch queued --name N --zone Z --topology v5p-64 [--spot | --best-effort] -- opsd-jax train --config C

The steps, in order (each printed exactly by --dry-run):
  1. `gcloud compute tpus tpu-vm create` (with --create), or `queued-resources create` and its
     `describe` polled until ACTIVE;
  2. the working tree packed into a tarball here (no .git, .venv or runs/), copied to every worker
     with `tpu-vm scp --worker=all`, unpacked over ~/opsd-jax (an earlier run directory there is
     kept) and installed (`pip install -e .[tpu]` in ~/opsd-jax/.venv, a Python 3.11 from uv
     where the image's python3 is older) with `tpu-vm ssh --worker=all` (skipped with --no-install);
  3. the command, on every worker at once (`tpu-vm ssh --worker=all`), from ~/opsd-jax with the
     virtualenv first on PATH and, on a multi-host slice, OPSD_JAX_DISTRIBUTED=1, which makes
     every process call jax.distributed.initialize() (JAX reads the pod from the TPU metadata).
A preempted run exits 42 (`train.preemption_exit_code`); the run command again (`--no-install`,
without --create) resumes it on the same slice. A spot slice that is reclaimed is deleted with its
disks, and a queued resource whose slice was reclaimed goes to SUSPENDED and must be deleted
(`gcloud compute tpus queued-resources delete ID`) before the same id is requested again: keep
`train.output_dir` on storage that outlives the slice, then request it again and rerun to continue
from the last checkpoint there.

By default the command runs detached on every worker (`remote_job`): the launcher checks that no
earlier job is still running there (before installing over its code), starts the job in its own
session with its output in ~/opsd-jax/runs/launch/job.log, then follows worker 0's log until the
job ends and exits with its code. A dropped connection or Ctrl-C stops only the following;
`opsd-jax launch logs | status | stop` reattach, report every worker, or send every worker's job
SIGTERM (the trainer saves and exits 42). `--foreground` runs the command inside `tpu-vm ssh`
instead, so a dropped session ends it.
"""

from __future__ import annotations

import dataclasses
import os
import shlex

from opsd_jax.launch import remote_job
from opsd_jax.launch.commands import Step
from opsd_jax.plan.topology import GENERATIONS, Topology

# TPU VM software versions per generation (Cloud TPU's "TPU software versions" page).
RUNTIME_VERSIONS = {"v4": "tpu-ubuntu2204-base", "v5e": "v2-alpha-tpuv5-lite", "v5p": "v2-alpha-tpuv5",
                    "v6e": "v2-alpha-tpuv6e"}
assert set(RUNTIME_VERSIONS) == set(GENERATIONS)
# $HOME, not ~: a tilde after `=` expands only in an assignment, and the detached form passes PATH to env.
REMOTE_DIR = "$HOME/opsd-jax"
PYTHON = "3.11"  # pyproject's requires-python, and jax's
PYTHON_CHECK = "import sys; sys.exit(sys.version_info < (3, 11))"
UV_INSTALLER = "https://astral.sh/uv/install.sh"
EXCLUDED = (".git", ".venv", "runs", "__pycache__", "*.egg-info")


@dataclasses.dataclass(frozen=True)
class Slice:
    name: str  # the TPU VM (node) name
    zone: str
    topology: Topology | None  # None: commands on an existing slice's workers (logs, status, stop)
    project: str | None = None
    runtime_version: str | None = None  # default: RUNTIME_VERSIONS of the generation

    @property
    def version(self) -> str:
        return self.runtime_version or RUNTIME_VERSIONS[self.topology.generation.name]

    def flags(self) -> list[str]:
        return [f"--zone={self.zone}"] + ([f"--project={self.project}"] if self.project else [])


def create_vm(s: Slice, *, spot: bool = False) -> Step:
    return Step(("gcloud", "compute", "tpus", "tpu-vm", "create", s.name, *s.flags(),
                 f"--accelerator-type={s.topology.accelerator_type}", f"--version={s.version}",
                 *(["--spot"] if spot else [])))


def create_queued(s: Slice, queued_id: str, *, spot: bool = False, best_effort: bool = False) -> list[Step]:
    """The queued resource request (best-effort is a gcloud alpha flag) and its state, polled."""
    if spot and best_effort:
        raise ValueError("--spot and --best-effort exclude each other")
    alpha = ("alpha",) if best_effort else ()
    create = Step(("gcloud", *alpha, "compute", "tpus", "queued-resources", "create", queued_id, *s.flags(),
                   f"--node-id={s.name}", f"--accelerator-type={s.topology.accelerator_type}",
                   f"--runtime-version={s.version}",
                   *(["--spot"] if spot else []), *(["--best-effort"] if best_effort else [])))
    wait = Step(("gcloud", "compute", "tpus", "queued-resources", "describe", queued_id, *s.flags(),
                 "--format=value(state.state)"), until=("ACTIVE",))
    return [create, wait]


def archive_name(s: Slice) -> str:
    return f"opsd-jax-{s.name}.tar.gz"


def pack(source_dir: str, archive: str) -> Step:
    excludes = [f"--exclude={pattern}" for pattern in EXCLUDED]
    return Step(("tar", "-czf", archive, *excludes, "-C", source_dir, "."))


def ssh(s: Slice, command: str, worker: str = "all") -> Step:
    return Step(("gcloud", "compute", "tpus", "tpu-vm", "ssh", s.name, *s.flags(), f"--worker={worker}",
                 f"--command={command}"))


def ssh_all(s: Slice, command: str) -> Step:
    return ssh(s, command, "all")


def install_steps(s: Slice, source_dir: str, archive_dir: str, extras: str = "tpu") -> list[Step]:
    """Pack the tree here, copy it to every worker, unpack and pip-install it there."""
    archive = os.path.join(archive_dir, archive_name(s))
    copy = Step(("gcloud", "compute", "tpus", "tpu-vm", "scp", archive, f"{s.name}:{archive_name(s)}", *s.flags(),
                 "--worker=all"))
    # Unpacked over an earlier install: a run directory inside it (runs/...) and its checkpoints stay.
    # jax 0.10 needs Python >= 3.11; the TPU VM images are Ubuntu 22.04 (python3 3.10), so the
    # virtualenv takes uv's managed 3.11 there (uv's installer fetches it) and python3 elsewhere.
    install = (f"set -e; mkdir -p {REMOTE_DIR}; tar -xzf ~/{archive_name(s)} -C {REMOTE_DIR}; cd {REMOTE_DIR}; "
               f"if [ -x .venv/bin/python ] && .venv/bin/python -c '{PYTHON_CHECK}'; then :; "
               f"elif python3 -c '{PYTHON_CHECK}'; then python3 -m venv .venv; "
               f"else command -v uv >/dev/null || curl -LsSf {UV_INSTALLER} | sh; "
               f"rm -rf .venv; PATH=$HOME/.local/bin:$PATH uv venv -q --python {PYTHON} .venv; "
               f"PATH=$HOME/.local/bin:$PATH uv pip install -q --python .venv/bin/python pip; fi; "
               f".venv/bin/python -m pip install -q -e '.[{extras}]'")
    return [pack(source_dir, archive), copy, ssh_all(s, install)]


def remote_environment(hosts: int) -> dict[str, str]:
    """What every worker adds to its environment: the virtualenv first on PATH and, on a multi-host
    slice, jax.distributed told to join the slice (parallel.initialize_distributed)."""
    return {"PATH": f"{REMOTE_DIR}/.venv/bin:$PATH",
            **({"OPSD_JAX_DISTRIBUTED": "1"} if hosts > 1 else {})}


def remote_command(argv: list[str], hosts: int) -> str:
    """`argv` as every worker runs it in the foreground: from the installed tree, with
    `remote_environment` (JAX reads the pod from the TPU metadata)."""
    if not argv:
        raise ValueError("no command to run (give it after --, e.g. -- opsd-jax train --config configs/X.yaml)")
    assignments = "".join(f"{name}={value} " for name, value in remote_environment(hosts).items())
    return f"cd {REMOTE_DIR} && {assignments}" + shlex.join(argv)


def command_steps(s: Slice, argv: list[str], *, install: bool, source_dir: str, archive_dir: str,
                  foreground: bool) -> tuple[list[Step], list[Step]]:
    """(the steps that start the command on every worker, the step that follows it). Detached: no
    earlier job may still run on any worker (checked before the install replaces its code), then
    the job starts on all of them and worker 0's log is followed until it ends. Foreground: the
    command itself inside `tpu-vm ssh`, nothing to follow."""
    if foreground:
        command = remote_command(argv, s.topology.hosts)  # refuses an empty command before anything runs
        return (install_steps(s, source_dir, archive_dir) if install else []) + [ssh_all(s, command)], []
    begin = remote_job.start(REMOTE_DIR, remote_environment(s.topology.hosts), argv)
    steps = [ssh_all(s, remote_job.check_idle())]
    steps += install_steps(s, source_dir, archive_dir) if install else []
    return steps + [ssh_all(s, begin)], [ssh(s, remote_job.follow(), "0")]


def tpu_vm_steps(s: Slice, argv: list[str], *, create: bool = False, spot: bool = False, install: bool = True,
                 source_dir: str = ".", archive_dir: str = "/tmp",
                 foreground: bool = False) -> tuple[list[Step], list[Step]]:
    """(steps to start the command, steps that follow it; see `command_steps`)."""
    steps, following = command_steps(s, argv, install=install, source_dir=source_dir, archive_dir=archive_dir,
                                     foreground=foreground)
    return ([create_vm(s, spot=spot)] if create else []) + steps, following


def queued_steps(s: Slice, argv: list[str], *, queued_id: str | None = None, spot: bool = False,
                 best_effort: bool = False, install: bool = True, source_dir: str = ".",
                 archive_dir: str = "/tmp", foreground: bool = False) -> tuple[list[Step], list[Step]]:
    """(steps to request the slice and start the command, steps that follow it)."""
    steps, following = command_steps(s, argv, install=install, source_dir=source_dir, archive_dir=archive_dir,
                                     foreground=foreground)
    return create_queued(s, queued_id or f"{s.name}-qr", spot=spot, best_effort=best_effort) + steps, following


__all__ = ["RUNTIME_VERSIONS", "Slice", "command_steps", "create_queued", "create_vm", "install_steps",
           "queued_steps", "remote_command", "remote_environment", "ssh", "ssh_all", "tpu_vm_steps"]
