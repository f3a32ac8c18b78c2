#!/usr/bin/env bash
# Regenerates the examples in this folder (tests/test_launch_targets.py checks they are current).
set -euo pipefail
cd "$(dirname "$0")/../.."
GCS=(run_dir=gs://my-bucket/runs/llama_8b data.path=gs://my-bucket/data/fineweb-edu)
flaxpod launch --target tpu-vm --tpu my-v5e-256 --zone us-west4-a --accelerator v5litepod-256 \
  --out docs/launch/tpu-vm-v5e-256 configs/llama_8b.yaml "${GCS[@]}"
flaxpod launch --target gke --accelerator v5litepod-256 --slices 2 --cluster my-cluster \
  --out docs/launch/gke-2x-v5e-256 configs/llama_8b.yaml "${GCS[@]}" mesh.data=2 mesh.dcn_data=2
flaxpod launch --target slurm --nodes 4 --gpus-per-node 8 --partition gpu --time 48:00:00 --venv /shared/flaxpod-venv \
  --out docs/launch/slurm-4x8-h100 configs/llama_8b.yaml run_dir=/shared/runs/llama_8b \
  data.path=/shared/data/fineweb-edu mesh.data=4 mesh.dcn_data=4 mesh.fsdp=2
