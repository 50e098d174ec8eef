"""Cluster launchers for msca_jax.main: Cloud TPU VMs (tpu_vm), SLURM (slurm), the local host (local)."""
