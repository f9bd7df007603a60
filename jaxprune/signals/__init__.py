"""Layer 2: per-example gradients of the user's loss, materialised in chunks or matrix-free."""
from jaxprune.signals.gradients import (DenseOperator, GradientOperator, LossFn, MatrixFreeOperator,
                                        add_gradient_noise, batch_size, chunk_size_for, classification_loss,
                                        dense_operator, default_memory_budget,
                                        gradient_operator, grads_and_projections, per_example_grads, weight_reuse)

__all__ = ["DenseOperator", "GradientOperator", "LossFn", "MatrixFreeOperator", "add_gradient_noise", "batch_size",
           "chunk_size_for", "classification_loss", "default_memory_budget", "dense_operator", "gradient_operator",
           "grads_and_projections", "per_example_grads", "weight_reuse"]
