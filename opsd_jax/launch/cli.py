"""`opsd-jax launch tpu-vm | queued | gke`: the arguments and what each runs (see each module)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from opsd_jax.launch.commands import LaunchError, Step, run_steps

SSH_CONNECTION_FAILED = 255  # ssh's own exit code; a remote command's code passes through
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _node_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", required=True, help="the TPU VM (node) name")
    parser.add_argument("--zone", required=True)
    parser.add_argument("--project", help="default: gcloud's configured project")


def _slice_arguments(parser: argparse.ArgumentParser) -> None:
    _node_arguments(parser)
    parser.add_argument("--topology", required=True, help="v5e-N / v6e-N (chips) or v4-N / v5p-N (TensorCores)")
    parser.add_argument("--runtime-version", help="TPU software version (default: the generation's usual one)")
    parser.add_argument("--no-install", dest="install", action="store_false",
                        help="skip copying and installing this tree on the workers")
    parser.add_argument("--source", default=REPO, help="the tree to install (default: this checkout)")
    parser.add_argument("--archive-dir", default="/tmp", help="where the tarball of the tree is written here")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--foreground", action="store_true",
                        help="run the command inside `tpu-vm ssh` (a dropped session ends it) instead of detached "
                             "with its log followed")
    parser.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND",
                        help="what every worker runs, e.g. -- opsd-jax train --config configs/X.yaml")


def add_arguments(launch: argparse.ArgumentParser) -> None:
    targets = launch.add_subparsers(dest="launch_target", required=True)
    vm = targets.add_parser("tpu-vm", help="a TPU VM slice: [create,] install on every worker, run everywhere")
    _slice_arguments(vm)
    vm.add_argument("--create", action="store_true", help="create the slice first (tpu-vm create)")
    vm.add_argument("--spot", action="store_true", help="with --create: a Spot slice")
    vm.set_defaults(launch_run=_tpu_vm)

    queued = targets.add_parser("queued", help="a queued resource: request, wait for ACTIVE, install, run")
    _slice_arguments(queued)
    queued.add_argument("--queued-id", help="the queued resource's id (default: NAME-qr)")
    capacity = queued.add_mutually_exclusive_group()
    capacity.add_argument("--spot", action="store_true", help="Spot capacity (preemptible)")
    capacity.add_argument("--best-effort", action="store_true", help="best-effort capacity (gcloud alpha)")
    queued.set_defaults(launch_run=_queued)

    logs = targets.add_parser("logs", help="a detached job's log on one worker (--follow: until it ends)")
    _node_arguments(logs)
    logs.add_argument("--worker", default="0", help="worker index (default 0), or all")
    logs.add_argument("--lines", type=int, default=50, help="how many of the last lines (default 50)")
    logs.add_argument("--follow", action="store_true", help="keep printing until the job ends (Ctrl-C leaves it running)")
    logs.add_argument("--dry-run", action="store_true", help="print the command, run nothing")
    logs.set_defaults(launch_run=_logs)
    status = targets.add_parser("status", help="every worker's detached job: running, exited with its code, "
                                               "or killed; the log's last line")
    stop = targets.add_parser("stop", help="SIGTERM to every worker's detached job: a training run saves and "
                                           "exits 42")
    stop.add_argument("--wait", action="store_true",
                      help="then follow worker 0's log until the job ends and exit with its code (42: saved)")
    for action, target in (("status", status), ("stop", stop)):
        _node_arguments(target)
        target.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
        target.set_defaults(launch_run=_on_every_worker, launch_action=action)

    gke = targets.add_parser("gke", help="a JobSet on GKE TPU node pools (restarts on the trainer's preemption "
                                         "code), and the equivalent XPK command")
    gke.add_argument("--config", required=True, metavar="YAML",
                     help="the run config, as a path inside the image (relative to the checkout root; "
                          "read here to size the grace period)")
    gke.add_argument("--topology", required=True, help="one slice, e.g. v5p-64")
    gke.add_argument("--image", required=True, help="container image built from launch/Dockerfile")
    gke.add_argument("--num-slices", type=int, default=1)
    gke.add_argument("--max-restarts", type=int, default=3, help="JobSet restarts (preemptions) before giving up")
    gke.add_argument("--spot", action="store_true", help="schedule on Spot TPU node pools")
    gke.add_argument("--name", help="JobSet name (default: from the config file name)")
    gke.add_argument("--bucket", help="mount this Cloud Storage bucket (GCS FUSE CSI) in every pod")
    gke.add_argument("--mount-path", default="/gcs", help="where --bucket is mounted")
    gke.add_argument("--service-account", help="Kubernetes service account of the pods (for the bucket)")
    gke.add_argument("--save-seconds-per-gib", type=float,
                     help="checkpoint save rate on the job's storage (default: OPSD_SAVE_SECONDS_PER_GIB, else the "
                          "rate measured on the build machine)")
    gke.add_argument("--step-seconds", type=float, default=0.0,
                     help="one training step's time: the step in flight finishes before the preemption save")
    gke.add_argument("--grace-seconds", type=int, help="use this grace period instead of the computed one")
    gke.add_argument("--model-config", help="folder with the student's config.json (as `opsd-jax plan`)")
    gke.add_argument("--cluster", default="CLUSTER", help="GKE cluster, for the XPK command line")
    gke.add_argument("--project", help="for the XPK command line")
    gke.add_argument("--zone", help="for the XPK command line")
    gke.add_argument("--output", help="manifest file (default: NAME.jobset.yaml here)")
    gke.add_argument("--dry-run", action="store_true", help="print the manifest and the commands, run nothing")
    gke.add_argument("overrides", nargs="*", metavar="section.key=value", help="passed to `opsd-jax train` too")
    gke.set_defaults(launch_run=_gke)


def run(args) -> int:
    try:
        return args.launch_run(args)
    except LaunchError as e:
        print(f"opsd-jax launch: {e}", file=sys.stderr)
        if e.code == 42:
            print("exit code 42: the run was preempted and saved; the same command again resumes it", file=sys.stderr)
        return e.code or 1


def _user_command(args) -> list[str]:
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    return command


def _slice(args):
    from opsd_jax.launch.tpu_vm import Slice
    from opsd_jax.plan.topology import parse_topology

    topology = parse_topology(args.topology) if getattr(args, "topology", None) else None
    return Slice(args.name, args.zone, topology, args.project, getattr(args, "runtime_version", None))


def _reattach_hint(args) -> str:
    where = shlex.join(["--name", args.name, "--zone", args.zone, *(["--project", args.project] if args.project else [])])
    return (f"the job keeps running on the slice: `opsd-jax launch logs {where} --follow` follows it again, "
            f"`opsd-jax launch status {where}` reports every worker, `opsd-jax launch stop {where}` stops it")


def _start_and_follow(args, steps: list[Step], following: list[Step], **run_options) -> int:
    """Runs the steps that start the job, then follows it (`_follow`). A detached start (the last
    step, when there is something to follow) that fails on some worker stops the jobs it did start
    there, rather than leave them waiting for the missing process."""
    if not following or args.dry_run:
        return run_steps(steps + following, dry_run=args.dry_run, **run_options)
    run_steps(steps[:-1], dry_run=False, **run_options)
    try:
        run_steps(steps[-1:], dry_run=False)
    except LaunchError as e:
        from opsd_jax.launch import remote_job
        from opsd_jax.launch.tpu_vm import ssh_all

        try:
            run_steps([ssh_all(_slice(args), remote_job.stop())], dry_run=False)
        except LaunchError as stop_error:
            raise LaunchError(f"{e}; stopping the workers' jobs failed too ({stop_error}): "
                              f"{_reattach_hint(args)}", e.code) from None
        raise LaunchError(f"{e}; the jobs that did start were sent SIGTERM", e.code) from None
    return _follow(args, following)


def _follow(args, following: list[Step]) -> int:
    """Follows a detached job until it ends and returns its code; a failure of the following itself
    (a dropped connection, Ctrl-C) says how to reattach: the job runs on."""
    try:
        return run_steps(following, dry_run=args.dry_run)
    except LaunchError as e:
        if e.code == 42:
            raise
        if e.code == SSH_CONNECTION_FAILED:
            raise LaunchError(f"the connection to worker 0 ended (ssh exit 255); {_reattach_hint(args)}",
                              e.code) from None
        raise LaunchError(f"worker 0's job exited with {e.code}; `opsd-jax launch status` reports every worker's "
                          f"code, `opsd-jax launch logs --worker N` any worker's log", e.code) from None
    except KeyboardInterrupt:
        print(f"\nstopped following. {_reattach_hint(args)}", file=sys.stderr)
        return 130


def _tpu_vm(args) -> int:
    from opsd_jax.launch.tpu_vm import tpu_vm_steps

    steps, following = tpu_vm_steps(_slice(args), _user_command(args), create=args.create, spot=args.spot,
                                     install=args.install, source_dir=args.source, archive_dir=args.archive_dir,
                                     foreground=args.foreground)
    return _start_and_follow(args, steps, following)


def _queued(args) -> int:
    from opsd_jax.launch.tpu_vm import queued_steps

    steps, following = queued_steps(_slice(args), _user_command(args), queued_id=args.queued_id, spot=args.spot,
                                    best_effort=args.best_effort, install=args.install, source_dir=args.source,
                                    archive_dir=args.archive_dir, foreground=args.foreground)
    return _start_and_follow(args, steps, following, failed_states=("FAILED", "SUSPENDED"))


def _logs(args) -> int:
    from opsd_jax.launch import remote_job
    from opsd_jax.launch.tpu_vm import ssh

    if args.worker != "all" and not args.worker.isdigit():
        raise LaunchError(f"--worker must be a worker index or all, got {args.worker!r}", 2)
    command = remote_job.show_log(args.lines, follow_while_running=args.follow)
    try:
        return run_steps([ssh(_slice(args), command, args.worker)], dry_run=args.dry_run)
    except KeyboardInterrupt:
        print("\nstopped following; the job keeps running", file=sys.stderr)
        return 130


def _on_every_worker(args) -> int:
    from opsd_jax.launch import remote_job
    from opsd_jax.launch.tpu_vm import ssh, ssh_all

    command = {"status": remote_job.status, "stop": remote_job.stop}[args.launch_action]()
    code = run_steps([ssh_all(_slice(args), command)], dry_run=args.dry_run)
    if getattr(args, "wait", False):
        return _follow(args, [ssh(_slice(args), remote_job.follow(), "0")])
    return code


def _gke(args) -> int:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # shapes only: never claim this host's accelerator
    from opsd_jax.config import load_config
    from opsd_jax.launch.gke import job_name, jobset_manifest, manifest_yaml, validate_manifest, xpk_command
    from opsd_jax.launch.grace import checkpoint_bytes, describe, grace_period_seconds
    from opsd_jax.plan.topology import parse_topology

    topology = parse_topology(args.topology)
    config = load_config(args.config, args.overrides)
    name = args.name or job_name(args.config)
    hosts = topology.hosts * args.num_slices
    state_bytes = checkpoint_bytes(config, model_config=args.model_config)
    rate, step = args.save_seconds_per_gib, args.step_seconds
    grace = args.grace_seconds or grace_period_seconds(state_bytes, hosts=hosts, seconds_per_gib=rate,
                                                       step_seconds=step)
    command = ["opsd-jax", "train", "--config", image_path(args.config), *args.overrides]
    common = {"name": name, "image": args.image, "command": command, "topology": topology,
              "num_slices": args.num_slices, "max_restarts": args.max_restarts, "spot": args.spot,
              "grace_seconds": grace, "preemption_exit_code": config.train.preemption_exit_code}
    manifest = jobset_manifest(**common, bucket=args.bucket, mount_path=args.mount_path,
                               service_account=args.service_account)
    validate_manifest(manifest)
    text = manifest_yaml(manifest)
    output = args.output or f"{name}.jobset.yaml"
    apply = Step(("kubectl", "apply", "-f", output))
    xpk = xpk_command(**common, cluster=args.cluster, project=args.project, zone=args.zone)
    print(f"# {describe(state_bytes, hosts=hosts, seconds_per_gib=rate, step_seconds=step)}")
    if args.grace_seconds:
        print(f"# grace period set by --grace-seconds: {grace} s")
    if args.dry_run:
        print(f"# manifest ({output}):")
        print(text, end="")
        print("# commands:")
        run_steps([apply], dry_run=True)
    else:
        from opsd_jax.eval.generations import write_atomic

        write_atomic(output, text)
        print(f"wrote {output}")
    print(f"# the same job with XPK (on a cluster made by `xpk cluster create`):\n# {shlex.join(xpk)}")
    if args.dry_run:
        return 0
    return run_steps([apply], dry_run=False)


def image_path(config: str) -> str:
    """The config's path inside the image: relative to the checkout root when it lies in this
    checkout (the image holds the checkout at its WORKDIR), else as given."""
    absolute = os.path.abspath(os.path.expanduser(config))
    if absolute.startswith(REPO + os.sep):
        return os.path.relpath(absolute, REPO)
    return config


__all__ = ["add_arguments", "image_path", "run"]
