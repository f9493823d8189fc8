"""A training job on GKE TPU node pools as a JobSet, and the XPK command line that does the same.

    opsd-jax launch gke --config configs/X.yaml --topology v5p-64 --image IMG [--num-slices N]
                        [--max-restarts K] [--spot] [--dry-run]

The JobSet (jobset.x-k8s.io/v1alpha2) runs one Indexed Job per slice (`replicas: N`), one pod per
TPU host, each requesting its host's chips and selecting the slice's node pool by accelerator and
topology (`cloud.google.com/gke-tpu-accelerator`, `cloud.google.com/gke-tpu-topology`); a
v5e-8 / v6e-8 asks for two pods of 4 chips, so its node pool must be the 4-chip machine type
(ct5lp-hightpu-4t / ct6e-standard-4t, two nodes), not the one-node 8-chip one. Restarts
follow XPK's default policy: a pod exiting with the trainer's restart code (42,
`train.preemption_exit_code`) or 127-255 (killed by a signal, lost node) fails its Job, and the
JobSet recreates every Job, up to `maxRestarts` times; any other non-zero code fails the Job by
the pod failure policy, and the JobSet fails without a restart (a bug does not loop). The relaunched
pods run the same command, which resumes (`--resume auto`). The pods' grace period is sized from
the checkpoint and the measured save rate (`grace.py`).

jax.distributed: GKE's TPU webhook gives each pod TPU_WORKER_HOSTNAMES and TPU_WORKER_ID (the
JobSet's headless service names the pods), which JAX reads; several slices also get
MEGASCALE_NUM_SLICES, MEGASCALE_SLICE_ID (the pod's Job index) and MEGASCALE_COORDINATOR_ADDRESS
(slice 0's first pod).

Storage: pods keep nothing between restarts, so `train.output_dir` (and the model and data) must be
on a volume that outlives them: `--bucket B` mounts a Cloud Storage bucket at `--mount-path`
through the GCS FUSE CSI driver (use a bucket with hierarchical namespace, whose folder renames are
atomic as Orbax's commit needs; the pods run on the host network, which the driver supports from
v1.17.2 through the volume's `hostNetworkPodKSA` attribute, set here), or mount a Filestore /
persistent disk yourself.
"""

from __future__ import annotations

import json
import re

from opsd_jax.plan.topology import GENERATIONS, Topology

API_VERSION = "jobset.x-k8s.io/v1alpha2"
CONTAINER = "trainer"
REPLICATED_JOB = "slice"
# GKE's node label value per TPU generation (cloud.google.com/gke-tpu-accelerator).
GKE_ACCELERATORS = {"v4": "tpu-v4-podslice", "v5e": "tpu-v5-lite-podslice", "v5p": "tpu-v5p-slice",
                    "v6e": "tpu-v6e-slice"}
assert set(GKE_ACCELERATORS) == set(GENERATIONS)
SIGNAL_EXIT_CODES = tuple(range(127, 256))  # command not found / killed by a signal, as XPK restarts on
MEGASCALE_PORT = 8080
IMAGE_WORKDIR = "/opt/opsd-jax"  # launch/Dockerfile's WORKDIR: the config paths are relative to it


def restart_exit_codes(preemption_exit_code: int = 42) -> list[int]:
    return sorted({preemption_exit_code, *SIGNAL_EXIT_CODES})


def job_name(text: str) -> str:
    """A JobSet name (DNS-1035 label, short enough that `<name>-slice-<i>-<j>` stays a valid
    hostname) from a config file name: configs/qwen3_8b_ot15k_dense.yaml -> qwen3-8b-ot15k-dense."""
    stem = re.sub(r"\.ya?ml$", "", text.rsplit("/", 1)[-1].lower())
    name = re.sub(r"[^a-z0-9-]+", "-", stem).strip("-")
    name = re.sub(r"^[^a-z]+", "", name)[:40].rstrip("-")
    return name or "opsd-jax"


def jobset_manifest(*, name: str, image: str, command: list[str], topology: Topology, num_slices: int = 1,
                    max_restarts: int = 3, spot: bool = False, grace_seconds: int = 30,
                    preemption_exit_code: int = 42, bucket: str | None = None, mount_path: str = "/gcs",
                    service_account: str | None = None, env: dict[str, str] | None = None) -> dict:
    """The JobSet as a dict (apiVersion, kind, metadata, spec), ready for YAML."""
    if num_slices < 1 or max_restarts < 0 or grace_seconds < 1:
        raise ValueError("--num-slices must be >= 1, --max-restarts >= 0, the grace period >= 1 s")
    hosts = topology.hosts
    if num_slices > 1 and hosts == 1:
        # GKE's Multislice runs on multi-host node pools only, and GKE gives a one-pod Job no
        # TPU_WORKER_HOSTNAMES, which jax.distributed needs beside the MEGASCALE variables.
        raise ValueError(f"--num-slices {num_slices}: GKE runs several slices only of multi-host topologies, "
                         f"and {topology.name} is one host; take a larger topology or one slice")
    variables = [{"name": "PYTHONUNBUFFERED", "value": "1"}]
    if num_slices > 1:
        variables += [
            {"name": "MEGASCALE_NUM_SLICES", "value": str(num_slices)},
            {"name": "MEGASCALE_SLICE_ID",
             "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['jobset.sigs.k8s.io/job-index']"}}},
            {"name": "MEGASCALE_COORDINATOR_ADDRESS", "value": f"{name}-{REPLICATED_JOB}-0-0.{name}"},
            {"name": "MEGASCALE_PORT", "value": str(MEGASCALE_PORT)},
        ]
    variables += [{"name": key, "value": str(value)} for key, value in sorted((env or {}).items())]
    container = {
        "name": CONTAINER, "image": image, "command": list(command), "workingDir": IMAGE_WORKDIR,
        "env": variables,
        "ports": [{"containerPort": 8471, "name": "tpu-runtime"}, {"containerPort": 8476, "name": "jax-coordinator"},
                  {"containerPort": MEGASCALE_PORT, "name": "megascale"}],
        "resources": {"limits": {"google.com/tpu": str(topology.chips_per_host)},
                      "requests": {"google.com/tpu": str(topology.chips_per_host)}},
    }
    node_selector = {"cloud.google.com/gke-tpu-accelerator": GKE_ACCELERATORS[topology.generation.name],
                     "cloud.google.com/gke-tpu-topology": "x".join(map(str, topology.shape))}
    tolerations = [{"key": "google.com/tpu", "operator": "Exists", "effect": "NoSchedule"}]
    if spot:
        node_selector["cloud.google.com/gke-spot"] = "true"
        tolerations.append({"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true",
                            "effect": "NoSchedule"})
    pod_spec = {
        "restartPolicy": "Never",  # a failed pod fails its Job; the JobSet decides on restarts
        "terminationGracePeriodSeconds": grace_seconds,
        "hostNetwork": True, "dnsPolicy": "ClusterFirstWithHostNet",  # DCN traffic between slices
        "nodeSelector": node_selector, "tolerations": tolerations, "containers": [container],
    }
    pod_metadata = {"labels": {"app.kubernetes.io/name": "opsd-jax", "opsd-jax/job": name}}
    if service_account:
        pod_spec["serviceAccountName"] = service_account
    if bucket:
        pod_metadata["annotations"] = {"gke-gcsfuse/volumes": "true"}
        pod_spec["volumes"] = [{"name": "gcs", "csi": {"driver": "gcsfuse.csi.storage.gke.io",
                                                       "volumeAttributes": {
                                                           "bucketName": bucket, "mountOptions": "implicit-dirs",
                                                           # the pods are on the host network
                                                           "hostNetworkPodKSA": "true"}}}]
        container["volumeMounts"] = [{"name": "gcs", "mountPath": mount_path}]
    job_spec = {
        "parallelism": hosts, "completions": hosts, "completionMode": "Indexed",
        "backoffLimit": 0,  # any pod failure fails the Job at once
        "podFailurePolicy": {"rules": [{
            "action": "FailJob",
            "onPodConditions": [],  # an absent list is refused by JobSet releases before the fix of #377
            "onExitCodes": {"containerName": CONTAINER, "operator": "NotIn",
                            "values": restart_exit_codes(preemption_exit_code)}}]},
        "template": {"metadata": pod_metadata, "spec": pod_spec},
    }
    return {
        "apiVersion": API_VERSION, "kind": "JobSet",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "opsd-jax"},
                     # one slice per node pool, as XPK places them
                     "annotations": {"alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"}},
        "spec": {
            "failurePolicy": {
                "maxRestarts": max_restarts,
                # A Job failed by the pod failure policy (a non-restart exit code) ends the JobSet;
                # any other Job failure (restart codes) restarts it while restarts remain.
                "rules": [{"name": "fail-on-non-restart-exit-code", "action": "FailJobSet",
                           "onJobFailureReasons": ["PodFailurePolicy"]}],
            },
            "network": {"enableDNSHostnames": True},
            "replicatedJobs": [{"name": REPLICATED_JOB, "replicas": num_slices,
                                "template": {"spec": job_spec}}],
        },
    }


def manifest_yaml(manifest: dict) -> str:
    import yaml

    return yaml.safe_dump(manifest, sort_keys=False, width=120, default_flow_style=None)


# ---- validation: JobSet fields by hand (the CRD has no Python model), the Job by the Kubernetes client's models


class ManifestError(ValueError):
    """A manifest that Kubernetes would reject; the message names the field."""


_JOBSET_SPEC = {"failurePolicy", "replicatedJobs", "network", "successPolicy", "startupPolicy", "suspend",
                "ttlSecondsAfterFinished", "coordinator", "managedBy"}
_FAILURE_POLICY = {"maxRestarts", "rules", "restartStrategy"}
_FAILURE_RULE = {"name", "action", "onJobFailureReasons", "targetReplicatedJobs"}
_FAILURE_ACTIONS = {"FailJobSet", "RestartJobSet", "RestartJobSetAndIgnoreMaxRestarts"}
_REPLICATED_JOB = {"name", "replicas", "template", "dependsOn", "groupName"}
_NETWORK = {"enableDNSHostnames", "subdomain", "publishNotReadyAddresses"}
_DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


def _keys(where: str, value, allowed: set, required: set = frozenset()) -> None:
    if not isinstance(value, dict):
        raise ManifestError(f"{where}: expected a mapping, got {type(value).__name__}")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise ManifestError(f"{where}: unknown field {unknown[0]!r} (valid: {', '.join(sorted(allowed))})")
    missing = sorted(required - set(value))
    if missing:
        raise ManifestError(f"{where}: missing field {missing[0]!r}")


def validate_manifest(manifest: dict) -> None:
    """Raises ManifestError for a JobSet Kubernetes would refuse: the JobSet fields against the
    v1alpha2 API; each replicated Job's template through the Kubernetes client's models (an unknown
    or misspelled field, a wrong type, a missing required field do not survive the round trip)."""
    _keys("JobSet", manifest, {"apiVersion", "kind", "metadata", "spec"}, {"apiVersion", "kind", "metadata", "spec"})
    if manifest["apiVersion"] != API_VERSION or manifest["kind"] != "JobSet":
        raise ManifestError(f"apiVersion/kind: expected {API_VERSION} JobSet")
    name = manifest["metadata"].get("name", "")
    if not _DNS_1035.fullmatch(name) or len(name) > 40:
        raise ManifestError(f"metadata.name: {name!r} is not a DNS-1035 label of at most 40 characters")
    spec = manifest["spec"]
    _keys("spec", spec, _JOBSET_SPEC, {"replicatedJobs"})
    policy = spec.get("failurePolicy", {})
    _keys("spec.failurePolicy", policy, _FAILURE_POLICY)
    if not isinstance(policy.get("maxRestarts", 0), int) or policy.get("maxRestarts", 0) < 0:
        raise ManifestError("spec.failurePolicy.maxRestarts: expected a non-negative integer")
    for i, rule in enumerate(policy.get("rules", [])):
        _keys(f"spec.failurePolicy.rules[{i}]", rule, _FAILURE_RULE, {"name", "action"})
        if rule["action"] not in _FAILURE_ACTIONS:
            raise ManifestError(f"spec.failurePolicy.rules[{i}].action: {rule['action']!r} is not one of "
                                f"{', '.join(sorted(_FAILURE_ACTIONS))}")
    _keys("spec.network", spec.get("network", {}), _NETWORK)
    jobs = spec["replicatedJobs"]
    if not isinstance(jobs, list) or not jobs:
        raise ManifestError("spec.replicatedJobs: expected a non-empty list")
    for i, job in enumerate(jobs):
        where = f"spec.replicatedJobs[{i}]"
        _keys(where, job, _REPLICATED_JOB, {"name", "template"})
        if not isinstance(job.get("replicas", 1), int) or job.get("replicas", 1) < 1:
            raise ManifestError(f"{where}.replicas: expected a positive integer")
        hostname = f"{name}-{job['name']}-{job.get('replicas', 1) - 1}-0"
        if len(hostname) > 63:
            raise ManifestError(f"{where}: pod hostname {hostname!r} exceeds 63 characters; shorten the name")
        _validate_job_template(f"{where}.template", job["template"])


def _validate_job_template(where: str, template: dict) -> None:
    try:
        from kubernetes.client import ApiClient
    except ImportError:  # the `launch` extra is not installed: the JobSet checks above only
        return

    import inspect

    class _Response:  # what older clients' deserialize(response, type) reads
        data = json.dumps(template)

    client = ApiClient()
    try:
        if "content_type" in inspect.signature(client.deserialize).parameters:  # kubernetes >= 35
            model = client.deserialize(json.dumps(template), "V1JobTemplateSpec", "application/json")
        else:
            model = client.deserialize(_Response(), "V1JobTemplateSpec")
    except (ValueError, TypeError) as e:
        raise ManifestError(f"{where}: {e}") from None
    back = client.sanitize_for_serialization(model)
    if back != json.loads(json.dumps(template)):
        raise ManifestError(f"{where}: fields the Kubernetes Job model does not know or types it does not accept: "
                            f"{_first_difference(json.loads(json.dumps(template)), back)}")
    spec = template.get("spec", {})
    if spec.get("podFailurePolicy") and spec.get("template", {}).get("spec", {}).get("restartPolicy") != "Never":
        raise ManifestError(f"{where}: a podFailurePolicy needs restartPolicy Never")


def _first_difference(a, b, path: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{path}.{key}" if path else key)
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return _first_difference(x, y, f"{path}[{i}]")
    return f"{path}: {a!r} became {b!r}"


# ---- XPK


def xpk_command(*, name: str, image: str, command: list[str], topology: Topology, cluster: str, num_slices: int = 1,
                max_restarts: int = 3, spot: bool = False, grace_seconds: int = 30, preemption_exit_code: int = 42,
                project: str | None = None, zone: str | None = None) -> list[str]:
    """`xpk workload create` for the same job: XPK writes an equivalent JobSet (its default pod
    failure policy already restarts on 42 and 127-255; another restart code is added)."""
    import shlex

    argv = ["xpk", "workload", "create", f"--cluster={cluster}", f"--workload={name}", f"--docker-image={image}",
            f"--tpu-type={topology.accelerator_type}", f"--num-slices={num_slices}", f"--max-restarts={max_restarts}",
            f"--termination-grace-period-seconds={grace_seconds}", f"--command={shlex.join(command)}"]
    if preemption_exit_code != 42:
        argv.append(f"--restart-on-exit-codes={preemption_exit_code}")
    if spot:
        argv.append("--spot")
    argv += [f"--project={project}"] if project else []
    argv += [f"--zone={zone}"] if zone else []
    return argv


__all__ = ["GKE_ACCELERATORS", "ManifestError", "job_name", "jobset_manifest", "manifest_yaml",
           "restart_exit_codes", "validate_manifest", "xpk_command"]
