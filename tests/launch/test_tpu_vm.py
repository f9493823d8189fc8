"""`opsd-jax launch tpu-vm | queued --dry-run` print exactly the commands they would run."""

import shlex

import pytest

from opsd_jax.cli import main
from opsd_jax.launch.tpu_vm import RUNTIME_VERSIONS
from opsd_jax.plan.topology import GENERATIONS

TRAIN = ["--", "opsd-jax", "train", "--config", "configs/qwen3_8b_ot15k_dense.yaml", "train.steps=3"]


def _dry_run(capsys, target, *argv) -> list[str]:
    assert main(["launch", target, "--dry-run", *argv]) == 0  # before the `--` that starts the command
    return capsys.readouterr().out.splitlines()


# jax needs Python >= 3.11 and the TPU VM images (Ubuntu 22.04) have 3.10: a usable virtualenv is
# kept, else one from python3 where it is new enough, else from uv's managed 3.11.
CHECK = "'import sys; sys.exit(sys.version_info < (3, 11))'"
INSTALL = ("set -e; mkdir -p $HOME/opsd-jax; tar -xzf ~/opsd-jax-opsd.tar.gz -C $HOME/opsd-jax; cd $HOME/opsd-jax; "
           f"if [ -x .venv/bin/python ] && .venv/bin/python -c {CHECK}; then :; "
           f"elif python3 -c {CHECK}; then python3 -m venv .venv; "
           "else command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh; rm -rf .venv; "
           "PATH=$HOME/.local/bin:$PATH uv venv -q --python 3.11 .venv; "
           "PATH=$HOME/.local/bin:$PATH uv pip install -q --python .venv/bin/python pip; fi; "
           ".venv/bin/python -m pip install -q -e '.[tpu]'")


CHECK_IDLE = ("'--command=if [ -f $HOME/opsd-jax/launch/job.sh ]; then bash $HOME/opsd-jax/launch/job.sh check; "
              "fi'")
FOLLOW = "'--command=bash $HOME/opsd-jax/launch/job.sh follow'"


def test_tpu_vm_creates_checks_installs_starts_detached_everywhere_and_follows_worker_0(capsys):
    lines = _dry_run(capsys, "tpu-vm", "--name", "opsd", "--zone", "us-east5-a", "--topology", "v5p-64",
                     "--project", "my-project", "--create", "--spot", "--source", "/src/opsd-jax", "--archive-dir",
                     "/tmp/a", *TRAIN)
    ssh = "gcloud compute tpus tpu-vm ssh opsd --zone=us-east5-a --project=my-project"
    assert lines == [
        ("gcloud compute tpus tpu-vm create opsd --zone=us-east5-a --project=my-project --accelerator-type=v5p-64 "
         "--version=v2-alpha-tpuv5 --spot"),
        f"{ssh} --worker=all {CHECK_IDLE}",  # before the install replaces a running job's code
        ("tar -czf /tmp/a/opsd-jax-opsd.tar.gz --exclude=.git --exclude=.venv --exclude=runs --exclude=__pycache__ "
         "'--exclude=*.egg-info' -C /src/opsd-jax ."),
        ("gcloud compute tpus tpu-vm scp /tmp/a/opsd-jax-opsd.tar.gz opsd:opsd-jax-opsd.tar.gz --zone=us-east5-a "
         "--project=my-project --worker=all"),
        shlex.join(["gcloud", "compute", "tpus", "tpu-vm", "ssh", "opsd", "--zone=us-east5-a", "--project=my-project",
                    "--worker=all", "--command=" + INSTALL]),
        (f"{ssh} --worker=all '--command=cd $HOME/opsd-jax && bash $HOME/opsd-jax/launch/job.sh start env "
         "PATH=$HOME/opsd-jax/.venv/bin:$PATH OPSD_JAX_DISTRIBUTED=1 opsd-jax train --config "
         "configs/qwen3_8b_ot15k_dense.yaml train.steps=3'"),
        f"{ssh} --worker=0 {FOLLOW}",
    ]


def test_foreground_runs_inside_ssh_and_a_single_host_slice_joins_no_cluster(capsys):
    lines = _dry_run(capsys, "tpu-vm", "--name", "one", "--zone", "z", "--topology", "v5e-4", "--no-install",
                     "--foreground", *TRAIN)
    assert lines == [("gcloud compute tpus tpu-vm ssh one --zone=z --worker=all '--command=cd $HOME/opsd-jax && "
                     "PATH=$HOME/opsd-jax/.venv/bin:$PATH opsd-jax train --config configs/qwen3_8b_ot15k_dense.yaml "
                     "train.steps=3'")]


@pytest.mark.parametrize("capacity, create", [
    ("--spot", ("gcloud compute tpus queued-resources create opsd-qr --zone=us-east5-a --node-id=opsd "
               "--accelerator-type=v6e-16 --runtime-version=v2-alpha-tpuv6e --spot")),
    ("--best-effort", ("gcloud alpha compute tpus queued-resources create opsd-qr --zone=us-east5-a --node-id=opsd "
                      "--accelerator-type=v6e-16 --runtime-version=v2-alpha-tpuv6e --best-effort")),
])
def test_queued_resource_requests_waits_for_active_then_runs(capsys, capacity, create):
    lines = _dry_run(capsys, "queued", "--name", "opsd", "--zone", "us-east5-a", "--topology", "v6e-16", capacity,
                     "--no-install", *TRAIN)
    ssh = "gcloud compute tpus tpu-vm ssh opsd --zone=us-east5-a"
    assert lines == [
        create,
        ("gcloud compute tpus queued-resources describe opsd-qr --zone=us-east5-a '--format=value(state.state)'"
         "  # again every 30 s until it prints ACTIVE"),
        f"{ssh} --worker=all {CHECK_IDLE}",
        (f"{ssh} --worker=all '--command=cd $HOME/opsd-jax && bash $HOME/opsd-jax/launch/job.sh start env "
         "PATH=$HOME/opsd-jax/.venv/bin:$PATH OPSD_JAX_DISTRIBUTED=1 opsd-jax train --config "
         "configs/qwen3_8b_ot15k_dense.yaml train.steps=3'"),
        f"{ssh} --worker=0 {FOLLOW}",
    ]


@pytest.mark.parametrize("argv, lines", [
    (["logs", "--worker", "3", "--lines", "200", "--follow"],
     ["--worker=3 '--command=bash $HOME/opsd-jax/launch/job.sh logs 200 follow'"]),
    (["logs"], ["--worker=0 '--command=bash $HOME/opsd-jax/launch/job.sh logs 50'"]),
    (["status"], ["--worker=all '--command=bash $HOME/opsd-jax/launch/job.sh status'"]),
    (["stop"], ["--worker=all '--command=bash $HOME/opsd-jax/launch/job.sh stop'"]),
    (["stop", "--wait"], ["--worker=all '--command=bash $HOME/opsd-jax/launch/job.sh stop'",
                          "--worker=0 '--command=bash $HOME/opsd-jax/launch/job.sh follow'"]),
])
def test_logs_status_and_stop_reach_the_detached_job(capsys, argv, lines):
    assert main(["launch", *argv, "--dry-run", "--name", "opsd", "--zone", "z", "--project", "p"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"gcloud compute tpus tpu-vm ssh opsd --zone=z --project=p {line}"
                                                    for line in lines]


def test_spot_and_best_effort_exclude_each_other_and_a_command_and_a_worker_are_checked(capsys):
    with pytest.raises(SystemExit):
        main(["launch", "queued", "--dry-run", "--name", "a", "--zone", "z", "--topology", "v6e-16", "--spot",
              "--best-effort", *TRAIN])
    assert main(["launch", "tpu-vm", "--dry-run", "--name", "a", "--zone", "z", "--topology", "v6e-16"]) == 2
    assert "no command to run" in capsys.readouterr().err
    assert main(["launch", "logs", "--dry-run", "--name", "a", "--zone", "z", "--worker", "w1"]) == 2
    assert "--worker must be a worker index or all, got 'w1'" in capsys.readouterr().err


def test_every_generation_has_a_runtime_version():
    assert set(RUNTIME_VERSIONS) == set(GENERATIONS)
