"""One file per variant for `--config=configs/<variant>.py[:ARG,...]`.

Each file calls msca_jax.configs.get with its own name: the recipe, the config arguments and the
checks live in the package (msca_jax/configs/), so an installed msca_jax builds the same configs
with `msca_jax.configs.get('<variant>', 'ARG')`.
"""
