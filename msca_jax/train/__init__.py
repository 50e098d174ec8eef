"""Training: mesh, optimisation, train state, checkpoints, evaluation."""
