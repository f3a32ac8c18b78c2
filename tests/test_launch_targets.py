"""`flaxpod launch --target tpu-vm|gke|slurm`: the generated files run (with stand-ins for gcloud and
srun), pass Kubernetes' own schemas, carry the run's config, and bad pods are refused in one line."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from flaxpod.sharding import launch
from flaxpod.train.config import config_from_dict, load_config, to_dict

REPO = Path(__file__).resolve().parents[1]
LLAMA_8B = str(REPO / "configs" / "llama_8b.yaml")
JAX_PIN = f"jax[tpu]=={metadata.version('jax')}"
K8S_VERSION = kubernetes_validate.latest_version()
# The JobSet CRD (jobset.x-k8s.io/v1alpha2) is not in Kubernetes' schemas: its own fields, from the
# JobSet API types, are checked here; each replicated job's template is a batch/v1 JobTemplateSpec and
# is checked against Kubernetes' schema.
JOBSET_FIELDS = {
    "spec": {"replicatedJobs", "network", "successPolicy", "failurePolicy", "startupPolicy", "suspend",
             "coordinator", "managedBy", "ttlSecondsAfterFinished"},
    "network": {"enableDNSHostnames", "subdomain", "publishNotReadyAddresses"},
    "failurePolicy": {"maxRestarts", "restartStrategy", "rules"},
    "replicatedJob": {"name", "groupName", "template", "replicas", "dependsOn"},
}  # fmt: skip


def run_launch(argv: list[str], capsys) -> tuple[int, str, str]:
    code = launch.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def write_fake(path: Path, body: str) -> Path:
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(0o755)
    return path


# --- TPU VM ------------------------------------------------------------------------------------

FAKE_GCLOUD = """
import json, os, shutil, sys
args = sys.argv[1:]
with open(os.environ["GCLOUD_LOG"], "a") as log:
    log.write(json.dumps(args) + "\\n")
if args[:4] == ["compute", "tpus", "tpu-vm", "scp"]:
    shutil.copy(args[4], os.environ["GCLOUD_SCP_COPY"])
"""


def test_tpu_vm_script_copies_the_config_and_starts_every_worker(tmp_path, capsys):
    argv = ["--target", "tpu-vm", "--tpu", "my-v5e", "--zone", "us-west4-a", "--accelerator", "v5litepod-256"]
    argv += ["--out", str(tmp_path / "out"), LLAMA_8B, "run_dir=gs://my-bucket/runs/llama_8b"]
    code, out, err = run_launch(argv, capsys)
    assert code == 0, err
    script = tmp_path / "out" / "launch.sh"
    assert f"wrote {script}" in out and os.access(script, os.X_OK)

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_fake(bin_dir / "gcloud", FAKE_GCLOUD)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", GCLOUD_LOG=str(tmp_path / "gcloud.log"))
    env["GCLOUD_SCP_COPY"] = str(tmp_path / "copied.yaml")
    for action in ("start", "logs", "stop"):
        done = subprocess.run(["bash", str(script), action], env=env, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
    calls = [json.loads(line) for line in (tmp_path / "gcloud.log").read_text().splitlines()]
    scp, start, logs, stop = calls
    assert scp[:4] == ["compute", "tpus", "tpu-vm", "scp"] and scp[5] == "my-v5e:flaxpod-config.yaml"
    for call in calls:
        assert "--worker=all" in call and "--zone=us-west4-a" in call
    # The config every worker gets is the run's, with the bucket's mount path as run directory.
    shipped = load_config(tmp_path / "copied.yaml")
    expected = load_config(LLAMA_8B, ["run_dir=/gcs/my-bucket/runs/llama_8b"])
    assert to_dict(shipped) == to_dict(expected)
    command = next(a for a in start if a.startswith("--command="))[len("--command=") :]
    assert subprocess.run(["bash", "-n"], input=command, text=True).returncode == 0
    assert f"'{JAX_PIN}' flaxpod=={metadata.version('flaxpod')}" in command
    assert "gcsfuse --implicit-dirs my-bucket /gcs/my-bucket" in command
    assert "FLAXPOD_AUTO_DISTRIBUTED=1 nohup ~/flaxpod/venv/bin/flaxpod pretrain ~/flaxpod-config.yaml" in command
    assert "~/flaxpod/train.log" in next(a for a in logs if a.startswith("--command="))
    assert "kill -TERM" in next(a for a in stop if a.startswith("--command="))


# --- refused pods ------------------------------------------------------------------------------

TPU_256 = ["--target", "tpu-vm", "--tpu", "t", "--zone", "z", "--accelerator", "v5litepod-256", "--dry-run"]
SLURM_4X8 = ["--target", "slurm", "--nodes", "4", "--gpus-per-node", "8", "--dry-run"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            [*TPU_256[:-2], "v5litepod-128", "--dry-run", LLAMA_8B, "mesh.fsdp=64", "run_dir=/shared/r"],
            "mesh: data*fsdp*tensor = 1*64*4 = 256 does not match the 128 devices (the pod: 1 slice(s) x 32 host(s)",
        ),
        (
            [*SLURM_4X8, LLAMA_8B, "mesh.data=-1", "mesh.fsdp=1", "mesh.tensor=8", "data.batch_size=8", "run_dir=/r"],
            "data.batch_size: the micro-batch of 8 rows (train.grad_accum=1) does not split evenly over 32 processes",
        ),
        ([*TPU_256, LLAMA_8B], "run_dir: 'runs/llama_8b' is relative, so each of the 64 hosts would use its own"),
        ([*SLURM_4X8, LLAMA_8B, "run_dir=/tmp/run"], "run_dir: '/tmp/run' is node-local storage"),
        ([*SLURM_4X8, LLAMA_8B, "run_dir=gs://b/r"], "run_dir: 'gs://b/r' is on Cloud Storage; this target needs"),
        (
            [*SLURM_4X8, LLAMA_8B, "run_dir=/shared/r", "data.path=corpus.txt"],
            "data.path: 'corpus.txt' is relative",
        ),
        (
            ["--target", "gke", "--accelerator", "v5litepod-256", "--slices", "2", "--dry-run", LLAMA_8B],
            "mesh.dcn_data * mesh.dcn_fsdp = 1 * 1 = 1 must equal the number of TPU slices, 2",
        ),
        (
            [*SLURM_4X8, LLAMA_8B, "run_dir=/shared/r", "mesh.data=-1", "mesh.fsdp=1", "mesh.dcn_data=8"],
            "mesh.dcn_data * mesh.dcn_fsdp = 8 must divide the number of nodes, 4",
        ),
        (["--target", "gke", "--accelerator", "v5e-3", "--dry-run", LLAMA_8B], "'v5e-3' is not a slice size"),
        (["--target", "tpu-vm", "--tpu", "t", "--accelerator", "v5e-8", "--dry-run", LLAMA_8B], "needs --zone"),
        (["--target", "slurm", "--nodes", "4", "--gpus-per-node", "8", LLAMA_8B], "one of the arguments --out"),
    ],
)
def test_a_config_that_does_not_fit_the_pod_is_refused_in_one_line(capsys, argv, message):
    code, out, err = run_launch(argv, capsys)
    assert code == 2 and out == ""
    assert message in err and err.count("\n") == 1, err


# --- GKE ---------------------------------------------------------------------------------------


def gke_documents(capsys, *argv: str) -> tuple[dict, dict, str]:
    code, out, err = run_launch(["--target", "gke", "--dry-run", *argv], capsys)
    assert code == 0, err
    manifest = out.split("==> jobset.yaml <==\n")[1].split("==> config.yaml <==")[0]
    config_map, jobset = yaml.safe_load_all(manifest)
    xpk = out.split("==> xpk.sh <==\n")[1]
    return config_map, jobset, xpk


def check_jobset_structure(jobset: dict) -> None:
    """JobSet fields by hand (its CRD is not in Kubernetes' schemas); every Job template by Kubernetes' schema."""
    assert jobset["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and jobset["kind"] == "JobSet"
    assert set(jobset) == {"apiVersion", "kind", "metadata", "spec"}
    spec = jobset["spec"]
    assert set(spec) <= JOBSET_FIELDS["spec"]
    assert set(spec["network"]) <= JOBSET_FIELDS["network"]
    assert set(spec["failurePolicy"]) <= JOBSET_FIELDS["failurePolicy"]
    for rjob in spec["replicatedJobs"]:
        assert set(rjob) <= JOBSET_FIELDS["replicatedJob"]
        assert isinstance(rjob["replicas"], int) and rjob["replicas"] >= 1
        job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": rjob["name"]}, **rjob["template"]}
        kubernetes_validate.validate(job, K8S_VERSION, strict=True)


def test_gke_tpu_multislice_jobset(capsys):
    overrides = ["run_dir=gs://my-bucket/runs/llama_8b", "mesh.data=2", "mesh.dcn_data=2"]
    config_map, jobset, xpk = gke_documents(
        capsys, "--accelerator", "v5litepod-256", "--slices", "2", LLAMA_8B, *overrides
    )
    kubernetes_validate.validate(config_map, K8S_VERSION, strict=True)
    check_jobset_structure(jobset)
    shipped = config_from_dict(yaml.safe_load(config_map["data"]["config.yaml"]))
    expected = load_config(LLAMA_8B, ["run_dir=/gcs/my-bucket/runs/llama_8b", *overrides[1:]])
    assert to_dict(shipped) == to_dict(expected)

    assert jobset["metadata"]["annotations"] == {
        "alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"
    }
    (rjob,) = jobset["spec"]["replicatedJobs"]  # one Job per slice
    assert rjob["replicas"] == 2
    job = rjob["template"]["spec"]
    assert job["parallelism"] == job["completions"] == 64  # hosts of a v5e-256 slice
    pod = job["template"]["spec"]
    assert pod["nodeSelector"] == {
        "cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice",
        "cloud.google.com/gke-tpu-topology": "16x16",
    }
    (container,) = pod["containers"]
    assert container["resources"]["limits"] == {"google.com/tpu": 4}
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    assert env["FLAXPOD_AUTO_DISTRIBUTED"] == "1" and env["MEGASCALE_NUM_SLICES"] == "2"
    assert env["MEGASCALE_COORDINATOR_ADDRESS"] == "flaxpod-llama-8b-slice-0-0.flaxpod-llama-8b"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["gcs-0"]["csi"]["volumeAttributes"]["bucketName"] == "my-bucket"
    assert "--tpu-type=v5litepod-256 --num-slices=2" in xpk

    # The check can fail: a misspelt Job field is caught.
    broken = copy.deepcopy(jobset)
    broken["spec"]["replicatedJobs"][0]["template"]["spec"]["paralelism"] = 64
    with pytest.raises(kubernetes_validate.ValidationError):
        check_jobset_structure(broken)


def test_gke_gpu_jobset(capsys):
    argv = ["--nodes", "4", "--gpus-per-node", "8", "--gpu-type", "nvidia-h100-80gb", LLAMA_8B]
    config_map, jobset, xpk = gke_documents(capsys, *argv, "run_dir=gs://b/r", "mesh.fsdp=8")
    check_jobset_structure(jobset)
    assert "annotations" not in jobset["metadata"]
    pod = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    (container,) = pod["containers"]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 8}
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    assert env["FLAXPOD_NUM_PROCESSES"] == "4"
    assert env["FLAXPOD_COORDINATOR_ADDRESS"] == "flaxpod-r-slice-0-0.flaxpod-r:8476"
    assert "--device-type=h100-80gb-8 --num-nodes=4" in xpk


# --- SLURM -------------------------------------------------------------------------------------

FAKE_SRUN = """
import json, os, sys
with open(os.environ["SRUN_LOG"], "w") as log:
    json.dump({"argv": sys.argv[1:], "env": {k: v for k, v in os.environ.items() if k.startswith("FLAXPOD_")}}, log)
"""


def test_sbatch_script_runs_one_task_per_gpu_under_srun(tmp_path, capsys):
    run_dir = tmp_path / "shared" / "run"
    venv = tmp_path / "venv"
    argv = ["--target", "slurm", "--nodes", "4", "--gpus-per-node", "8", "--venv", str(venv), "--partition", "gpu"]
    code, out, err = run_launch([*argv, "--dry-run", LLAMA_8B, "run_dir=/shared/run", "mesh.data=4", "mesh.dcn_data=4",
                                 "mesh.fsdp=2"], capsys)  # fmt: skip
    assert code == 0 and err == "", err
    script = out.split("==> job.sbatch <==\n")[1]
    directives = [line.split(None, 1)[1] for line in script.splitlines() if line.startswith("#SBATCH")]
    assert {"--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--partition=gpu"} <= set(directives)
    assert not any("gpus-per-task" in d or "gpu-bind" in d for d in directives)

    # Run it as the batch step would, with stand-ins for the venv's pip and for srun, in a temporary
    # directory standing for the shared filesystem (a real /tmp is refused as node-local).
    script = script.replace("/shared/run", str(run_dir))
    (venv / "bin").mkdir(parents=True)
    write_fake(venv / "bin" / "pip", "")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_fake(bin_dir / "srun", FAKE_SRUN)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="77", SRUN_LOG=str(tmp_path / "srun"))
    env["FLAXPOD_NUM_PROCESSES"] = "5"  # a stray variable that would override SLURM's detection
    env.pop("FLAXPOD_CACHE_DIR", None)  # the suite's (conftest.py), which the script rightly passes on
    done = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    srun = json.loads((tmp_path / "srun").read_text())
    config = run_dir / "launch" / "config-77.yaml"
    assert srun["argv"] == ["--kill-on-bad-exit=1", f"--output={run_dir}/logs/%j-task%t.log",
                            f"{venv}/bin/flaxpod", "pretrain", str(config)]  # fmt: skip
    assert srun["env"] == {"FLAXPOD_AUTO_DISTRIBUTED": "1"}
    shipped = load_config(config)
    assert (shipped.mesh.data, shipped.mesh.dcn_data, shipped.run_dir) == (4, 4, str(run_dir))


# --- the examples in docs/launch ---------------------------------------------------------------


@pytest.mark.slow  # three `flaxpod` processes, each importing jax
def test_docs_examples_are_what_the_generator_writes(tmp_path):
    examples = REPO / "docs" / "launch"
    (tmp_path / "docs" / "launch").mkdir(parents=True)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "llama_8b.yaml").write_text(Path(LLAMA_8B).read_text())
    script = tmp_path / "docs" / "launch" / "regenerate.sh"
    script.write_text((examples / "regenerate.sh").read_text())
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    written = sorted(p.relative_to(tmp_path / "docs" / "launch") for p in (tmp_path / "docs" / "launch").rglob("*.*"))
    kept = sorted(p.relative_to(examples) for p in examples.rglob("*.*"))
    assert written == kept
    for name in written:
        assert (tmp_path / "docs" / "launch" / name).read_text() == (examples / name).read_text(), name
