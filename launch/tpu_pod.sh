#!/usr/bin/env bash
# Runs one opsd-jax command on every worker of a Cloud TPU VM pod slice. JAX reads the pod from the
# TPU metadata; OPSD_JAX_DISTRIBUTED=1 makes opsd_jax.parallel.initialize_distributed() join it.
#   launch/tpu_pod.sh TPU_NAME ZONE -- opsd-jax convert --from-hf gs://... --to-orbax gs://... --mesh 1,-1,4
# The repository must already be installed on the workers in ~/opsd-jax (its .venv goes first on
# PATH); `opsd-jax launch tpu-vm`
# installs it, creates slices and queued resources, and prints its commands with --dry-run.
set -euo pipefail
[ $# -ge 4 ] && [ "$3" = "--" ] || { echo "usage: $0 TPU_NAME ZONE -- COMMAND..." >&2; exit 2; }
name=$1; zone=$2; shift 3
printf -v command '%q ' "$@"
gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all \
  --command "cd ~/opsd-jax && PATH=~/opsd-jax/.venv/bin:\$PATH OPSD_JAX_DISTRIBUTED=1 ${command}"
