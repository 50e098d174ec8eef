"""msca_jax: MSCA, TokenShift and frame-wise ViT video classifiers in JAX/Flax."""
