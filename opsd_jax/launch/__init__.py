"""Launching jobs on TPU VMs, queued resources and GKE (JobSet / XPK): one module per concern.

commands.py  shell commands, printed exactly (--dry-run) or run
tpu_vm.py    gcloud TPU VM and queued-resource commands: create, install on every worker, run everywhere
remote_job.py  the commands that start, follow, inspect and stop a detached job on every worker
               (each runs launch/job.sh from the installed tree)
gke.py       the JobSet manifest for a config and a topology, and the equivalent XPK command line
grace.py     checkpoint size and the termination grace period it needs at the measured save rate
cli.py       `opsd-jax launch tpu-vm | queued | logs | status | stop | gke`
"""
