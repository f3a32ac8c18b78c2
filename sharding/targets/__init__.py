"""Files that start a flaxpod run on a pod: a TPU VM script, a GKE JobSet, a SLURM batch script.

``flaxpod launch --target ...`` (:mod:`flaxpod.sharding.targets.cli`) derives them from a run's
config and checks them against it (:mod:`.pod`). They are generated as text: the tools that run
them (gcloud, kubectl/xpk, sbatch) are the user's; flaxpod depends on none of them.
"""
