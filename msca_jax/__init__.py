"""msca_jax: MSCA, TokenShift and frame-wise ViT video classifiers in JAX/Flax."""

from msca_jax import host_memory as _host_memory

# Before JAX picks a backend: the TPU compiler installed on a host without TPU chips changes
# nothing of a CPU run (msca_jax/host_memory.py).
_host_memory.cpu_unless_tpu_attached()
