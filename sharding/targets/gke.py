"""``--target gke``: a JobSet manifest (and the equivalent ``xpk workload create`` line).

TPU: one replicated job of ``slices`` Jobs, one Job per slice, each with one pod per host. Pods
select their slice's node pool by the GKE TPU labels (accelerator and topology), ask for the
host's chips as ``google.com/tpu``, and the JobSet's exclusive-topology annotation puts each Job on
a node pool of its own (one slice). JAX finds its peers itself (``FLAXPOD_AUTO_DISTRIBUTED=1``):
GKE injects ``TPU_WORKER_ID``/``TPU_WORKER_HOSTNAMES`` inside a slice; across slices it reads the
``MEGASCALE_*`` variables set here.

GPU: one Job of ``nodes`` pods, each driving all of its node's GPUs (``nvidia.com/gpu``); JAX's
Kubernetes detection needs the ``kubernetes`` package and API rights, so the ``FLAXPOD_*``
variables are set instead, from the pod's completion index and pod 0's stable JobSet host name.

The config travels in a ConfigMap; a ``gs://`` run directory is mounted with the Cloud Storage
FUSE CSI driver at the same path in every pod.
"""

import shlex
from dataclasses import dataclass
from typing import Any

import yaml
from flaxpod.data.text import DEFAULT_CORPUS
from flaxpod.model.errors import ConfigError
from flaxpod.sharding.distributed import (
    AUTO_DISTRIBUTED_ENV,
    COORDINATOR_ADDRESS_ENV,
    NUM_PROCESSES_ENV,
    PROCESS_ID_ENV,
)
from flaxpod.sharding.targets.accelerators import TpuSlice
from flaxpod.sharding.targets.common import resolved_config_yaml, shell_join
from flaxpod.sharding.targets.pod import GCS_MOUNT_ROOT, Job

JOBSET_API = "jobset.x-k8s.io/v1alpha2"
REPLICATED_JOB = "slice"
CONFIG_DIR = "/etc/flaxpod"
COORDINATOR_PORT = 8476  # GPU: the JAX coordinator on pod 0 (pods have their own network namespace)
TPU_PORTS = (8471, 8080)  # TPU runtime and metadata ports that xpk's manifests open as well
JOB_INDEX = "metadata.annotations['jobset.sigs.k8s.io/job-index']"
COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"


@dataclass(frozen=True)
class GkeTarget:
    name: str
    """JobSet name (a DNS label): pods are NAME-slice-J-P."""
    image: str
    tpu: TpuSlice | None
    gpu_type: str | None
    """GKE's cloud.google.com/gke-accelerator label for GPU nodes, e.g. nvidia-h100-80gb."""
    cluster: str | None = None


class _BlockDumper(yaml.SafeDumper):
    """Writes multi-line strings (the config in the ConfigMap) as readable `|` blocks."""


def _str_block(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    style = "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_BlockDumper.add_representer(str, _str_block)


def _field_env(name: str, path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def _container_env(job: Job, target: GkeTarget) -> list[dict[str, Any]]:
    if target.tpu is not None:
        env: list[dict[str, Any]] = [{"name": AUTO_DISTRIBUTED_ENV, "value": "1"}]
        if job.pod.slices > 1:
            env += [
                {"name": "MEGASCALE_COORDINATOR_ADDRESS", "value": f"{target.name}-{REPLICATED_JOB}-0-0.{target.name}"},
                {"name": "MEGASCALE_NUM_SLICES", "value": str(job.pod.slices)},
                _field_env("MEGASCALE_SLICE_ID", JOB_INDEX),
            ]
        return env
    return [
        {"name": NUM_PROCESSES_ENV, "value": str(job.pod.processes)},
        _field_env(PROCESS_ID_ENV, COMPLETION_INDEX),
        {
            "name": COORDINATOR_ADDRESS_ENV,
            "value": f"{target.name}-{REPLICATED_JOB}-0-0.{target.name}:{COORDINATOR_PORT}",
        },
    ]


def _pod_spec(job: Job, target: GkeTarget, command: str) -> dict[str, Any]:
    mounts = [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True}]
    volumes: list[dict[str, Any]] = [{"name": "config", "configMap": {"name": f"{target.name}-config"}}]
    for i, bucket in enumerate(job.buckets):
        mounts.append({"name": f"gcs-{i}", "mountPath": f"{GCS_MOUNT_ROOT}/{bucket}"})
        volumes.append(
            {
                "name": f"gcs-{i}",
                "csi": {
                    "driver": "gcsfuse.csi.storage.gke.io",
                    "volumeAttributes": {"bucketName": bucket, "mountOptions": "implicit-dirs"},
                },
            }
        )
    container: dict[str, Any] = {
        "name": "flaxpod",
        "image": target.image,
        "command": ["bash", "-c", command],
        "env": _container_env(job, target),
        "volumeMounts": mounts,
    }
    if target.tpu is not None:
        container["ports"] = [{"containerPort": port} for port in TPU_PORTS]
        container["resources"] = {"limits": {"google.com/tpu": target.tpu.chips_per_host}}
        node_selector = {
            "cloud.google.com/gke-tpu-accelerator": target.tpu.gke_accelerator,
            "cloud.google.com/gke-tpu-topology": target.tpu.topology,
        }
    else:
        container["ports"] = [{"containerPort": COORDINATOR_PORT}]
        container["resources"] = {"limits": {"nvidia.com/gpu": job.pod.devices_per_host}}
        node_selector = {"cloud.google.com/gke-accelerator": target.gpu_type}
    return {
        "restartPolicy": "Never",
        "nodeSelector": node_selector,
        "containers": [container],
        "volumes": volumes,
    }


def _check_paths_reach_pods(job: Job) -> None:
    # A pod sees only its image, the ConfigMap and the mounted buckets.
    if job.pod.hosts == 1:
        return
    paths = [("run_dir", job.cfg.run_dir), ("tokenizer.path", job.cfg.tokenizer.path)]
    paths += [("data.path", p) for p in job.cfg.data.path.split(",") if p != DEFAULT_CORPUS]
    for key, path in paths:
        if path and not path.startswith(GCS_MOUNT_ROOT + "/"):
            raise ConfigError(
                f"{key}: {path!r}: on GKE a run on {job.pod.hosts} hosts reads and writes gs://BUCKET/PATH "
                "(mounted in every pod with the Cloud Storage FUSE CSI driver)"
            )


def jobset_manifest(job: Job, target: GkeTarget, packages: list[str], entry: str, header: str) -> str:
    """A ConfigMap (the resolved config) and the JobSet, as one multi-document YAML file."""
    _check_paths_reach_pods(job)
    command = (
        f"set -euo pipefail; pip install -q {shell_join(packages)}; "
        f"exec flaxpod {entry} {shlex.quote(CONFIG_DIR + '/config.yaml')}"
    )
    pod_template: dict[str, Any] = {}
    if job.buckets:  # asks GKE to add the Cloud Storage FUSE sidecar
        pod_template["metadata"] = {"annotations": {"gke-gcsfuse/volumes": "true"}}
    pod_template["spec"] = _pod_spec(job, target, command)
    hosts = job.pod.hosts_per_slice
    jobset = {
        "apiVersion": JOBSET_API,
        "kind": "JobSet",
        "metadata": {
            "name": target.name,
            # One Job per node pool: with TPUs, a slice is a node pool.
            "annotations": {"alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"},
        },
        "spec": {
            # Any failed pod fails the run (its peers cannot go on without it); re-apply to resume.
            "failurePolicy": {"maxRestarts": 0},
            "network": {"enableDNSHostnames": True},
            "replicatedJobs": [
                {
                    "name": REPLICATED_JOB,
                    "replicas": job.pod.slices,
                    "template": {
                        "spec": {
                            "parallelism": hosts,
                            "completions": hosts,
                            "completionMode": "Indexed",
                            "backoffLimit": 0,
                            "template": pod_template,
                        }
                    },
                }
            ],
        },
    }
    if target.tpu is None:
        del jobset["metadata"]["annotations"]  # GPU nodes of one pool may hold several pods' worth
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"{target.name}-config"},
        "data": {"config.yaml": resolved_config_yaml(job)},
    }
    body = yaml.dump_all([config_map, jobset], Dumper=_BlockDumper, sort_keys=False, width=120)
    pod = job.pod
    return (
        f"{header}\n# GKE JobSet {target.name}: {pod.describe()}.\n"
        f"# mesh {job.mesh_line()}; {job.rows_per_process} rows per process and step; run_dir {job.run_dir}\n"
        f"# kubectl apply -f jobset.yaml; logs: kubectl logs -f -l jobset.sigs.k8s.io/jobset-name={target.name}\n"
        f"{body}"
    )


def xpk_command(job: Job, target: GkeTarget, packages: list[str], entry: str, config_path: str) -> str:
    """The same run through xpk (which builds its own JobSet), for clusters made with xpk."""
    # Double quotes inside, so that the whole command needs only one pair of single quotes.
    pins = " ".join(f'"{p}"' for p in packages)
    command = f"pip install -q {pins} && FLAXPOD_AUTO_DISTRIBUTED=1 flaxpod {entry} {config_path}"
    words = [
        "xpk",
        "workload",
        "create",
        f"--cluster={target.cluster or 'CLUSTER'}",
        f"--workload={target.name}",
        f"--base-docker-image={target.image}",
        "--script-dir=.",  # run from the --out directory: xpk copies it, config.yaml included, into the image
        f"--command={command}",
    ]
    if target.tpu is not None:
        words += [f"--tpu-type={target.tpu.accelerator_type}", f"--num-slices={job.pod.slices}"]
    else:
        device_type = f"{target.gpu_type.removeprefix('nvidia-')}-{job.pod.devices_per_host}"  # e.g. h100-80gb-8
        words += [f"--device-type={device_type}", f"--num-nodes={job.pod.hosts}"]
    return shell_join(words)
