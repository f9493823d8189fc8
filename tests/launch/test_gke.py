"""The GKE JobSet: validated against the JobSet API and the Kubernetes client's Job models, with the
restart policy, grace period, node selectors and jax.distributed environment the job needs."""

import copy
import os
import shlex

import pytest
import yaml

from opsd_jax.cli import main
from opsd_jax.launch.gke import (
    GKE_ACCELERATORS,
    ManifestError,
    job_name,
    jobset_manifest,
    validate_manifest,
    xpk_command,
)
from opsd_jax.launch.grace import GiB, checkpoint_bytes, grace_period_seconds
from opsd_jax.plan.topology import GENERATIONS, parse_topology

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = "configs/qwen3_8b_ot15k_dense.yaml"

pytest.importorskip("kubernetes")  # the `launch` extra (in `test` too): validation needs its models


def _manifest(**extra):
    settings = {"name": "opsd", "image": "img:1", "command": ["opsd-jax", "train", "--config", CONFIG],
                "topology": parse_topology("v5p-64"), "grace_seconds": 120} | extra
    return jobset_manifest(**settings)


def _pod(manifest, slice_job=0):
    return manifest["spec"]["replicatedJobs"][slice_job]["template"]["spec"]["template"]["spec"]


def test_manifest_is_valid_and_restarts_only_on_the_restart_codes():
    manifest = _manifest(max_restarts=5)
    validate_manifest(manifest)
    job = manifest["spec"]["replicatedJobs"][0]["template"]["spec"]
    rule = job["podFailurePolicy"]["rules"][0]
    assert rule["action"] == "FailJob" and rule["onExitCodes"]["operator"] == "NotIn"
    assert rule["onExitCodes"]["values"] == [42, *range(127, 256)]
    assert rule["onExitCodes"]["containerName"] == _pod(manifest)["containers"][0]["name"]
    assert job["backoffLimit"] == 0 and _pod(manifest)["restartPolicy"] == "Never"
    policy = manifest["spec"]["failurePolicy"]
    assert policy["maxRestarts"] == 5
    assert policy["rules"] == [{"name": "fail-on-non-restart-exit-code", "action": "FailJobSet",
                                "onJobFailureReasons": ["PodFailurePolicy"]}]
    # Another restart code replaces 42 (127-255 stay).
    values = _manifest(preemption_exit_code=17)["spec"]["replicatedJobs"][0]["template"]["spec"]["podFailurePolicy"]
    assert values["rules"][0]["onExitCodes"]["values"] == [17, *range(127, 256)]


@pytest.mark.parametrize("name", ["v5p-64", "v5e-16", "v6e-8", "v4-32", "v5p-8"])
def test_node_selectors_and_chips_come_from_the_topology_table(name):
    topology = parse_topology(name)
    manifest = _manifest(topology=topology, spot=True)
    validate_manifest(manifest)
    pod = _pod(manifest)
    assert pod["nodeSelector"] == {
        "cloud.google.com/gke-tpu-accelerator": GKE_ACCELERATORS[topology.generation.name],
        "cloud.google.com/gke-tpu-topology": "x".join(map(str, topology.shape)),
        "cloud.google.com/gke-spot": "true"}
    chips = pod["containers"][0]["resources"]["limits"]["google.com/tpu"]
    job = manifest["spec"]["replicatedJobs"][0]["template"]["spec"]
    assert int(chips) * job["parallelism"] == topology.chips and job["parallelism"] == topology.hosts
    assert set(GKE_ACCELERATORS) == set(GENERATIONS)


def test_several_slices_get_the_megascale_environment():
    single = {v["name"] for v in _pod(_manifest())["containers"][0]["env"]}
    assert not any(name.startswith("MEGASCALE") for name in single)
    manifest = _manifest(num_slices=4, name="run")
    validate_manifest(manifest)
    assert manifest["spec"]["replicatedJobs"][0]["replicas"] == 4
    env = {v["name"]: v for v in _pod(manifest)["containers"][0]["env"]}
    assert env["MEGASCALE_NUM_SLICES"]["value"] == "4"
    assert env["MEGASCALE_SLICE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.labels['jobset.sigs.k8s.io/job-index']"
    assert env["MEGASCALE_COORDINATOR_ADDRESS"]["value"] == "run-slice-0-0.run"
    # GKE's Multislice needs multi-host slices (a one-pod Job gets no TPU_WORKER_HOSTNAMES).
    with pytest.raises(ValueError, match="--num-slices 2: GKE runs several slices only of multi-host topologies, "
                                         "and v5p-8 is one host"):
        _manifest(num_slices=2, topology=parse_topology("v5p-8"))


def test_bucket_mount_is_a_valid_gcs_fuse_volume():
    manifest = _manifest(bucket="my-bucket", mount_path="/data", service_account="trainer-sa")
    validate_manifest(manifest)
    pod = _pod(manifest)
    attributes = pod["volumes"][0]["csi"]["volumeAttributes"]
    # On the host network the driver authenticates the pod's service account only when asked to.
    assert attributes["bucketName"] == "my-bucket" and attributes["hostNetworkPodKSA"] == "true"
    assert pod["hostNetwork"] is True
    assert pod["containers"][0]["volumeMounts"] == [{"name": "gcs", "mountPath": "/data"}]


@pytest.mark.parametrize("break_it, message", [
    (lambda m: _pod(m)["containers"][0].update(imagePullPolicyy="Always"), "imagePullPolicyy"),
    (lambda m: m["spec"]["replicatedJobs"][0]["template"]["spec"].update(backoffLimit="none"), "backoffLimit"),
    (lambda m: _pod(m)["containers"][0].pop("name"), "name"),
    (lambda m: m["spec"]["failurePolicy"]["rules"][0].update(action="Restart"), "action: 'Restart' is not one of"),
    (lambda m: m["spec"].update(replicatedJob=[]), "unknown field 'replicatedJob'"),
    (lambda m: m["metadata"].update(name="Opsd_Run"), "not a DNS-1035 label"),
    (lambda m: _pod(m).update(restartPolicy="OnFailure"), "podFailurePolicy needs restartPolicy Never"),
])
def test_validation_rejects_what_kubernetes_would(break_it, message):
    manifest = copy.deepcopy(_manifest())
    break_it(manifest)
    with pytest.raises(ManifestError, match=message):
        validate_manifest(manifest)


def test_grace_period_is_sized_from_the_checkpoint_and_the_save_rate():
    config = _load(CONFIG)
    state = checkpoint_bytes(config)
    # Qwen3-8B in float32 with two float32 Adam moments: 8.19e9 parameters x 12 bytes.
    assert 91 * GiB < state < 92 * GiB
    eight_hosts = grace_period_seconds(state, hosts=8, seconds_per_gib=2.0)
    assert eight_hosts == int(-(-(5 + 2 * 2.0 * state / 8 / GiB + 30) // 1))
    assert grace_period_seconds(state, hosts=16, seconds_per_gib=2.0) < eight_hosts
    assert grace_period_seconds(state, hosts=8, seconds_per_gib=2.0, step_seconds=60) == eight_hosts + 60


def _load(path):
    from opsd_jax.config import load_config

    return load_config(os.path.join(REPO, path))


def test_cli_dry_run_prints_the_manifest_the_apply_command_and_the_xpk_line(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert main(["launch", "gke", "--config", CONFIG, "--topology", "v5p-64", "--image", "img:1", "--num-slices", "2",
                 "--max-restarts", "4", "--spot", "--save-seconds-per-gib", "2.0", "--cluster", "c1", "--dry-run",
                 "train.steps=3"]) == 0
    out = capsys.readouterr().out
    manifest_text = out.split("# manifest (qwen3-8b-ot15k-dense.jobset.yaml):\n", 1)[1].split("# commands:\n", 1)[0]
    manifest = yaml.safe_load(manifest_text)
    validate_manifest(manifest)
    pod = _pod(manifest)
    state = checkpoint_bytes(_load(CONFIG))
    assert pod["terminationGracePeriodSeconds"] == grace_period_seconds(state, hosts=16, seconds_per_gib=2.0)
    assert pod["containers"][0]["command"] == ["opsd-jax", "train", "--config", CONFIG, "train.steps=3"]
    assert manifest["spec"]["failurePolicy"]["maxRestarts"] == 4
    lines = out.splitlines()
    assert "kubectl apply -f qwen3-8b-ot15k-dense.jobset.yaml" in lines
    xpk = shlex.split(lines[-1].removeprefix("# "))
    assert xpk == xpk_command(name="qwen3-8b-ot15k-dense", image="img:1", command=pod["containers"][0]["command"],
                              topology=parse_topology("v5p-64"), cluster="c1", num_slices=2, max_restarts=4, spot=True,
                              grace_seconds=pod["terminationGracePeriodSeconds"])
    assert xpk[:3] == ["xpk", "workload", "create"] and "--tpu-type=v5p-64" in xpk and "--spot" in xpk
    assert not os.path.exists(os.path.join(REPO, "qwen3-8b-ot15k-dense.jobset.yaml"))  # a dry run writes nothing


def test_job_names_are_dns_labels():
    assert job_name("configs/qwen3_8b_ot15k_dense.yaml") == "qwen3-8b-ot15k-dense"
    assert job_name("/x/2024_Run.YAML") == "run"
    validate_manifest(_manifest(name=job_name("configs/" + "a" * 80 + ".yaml")))
