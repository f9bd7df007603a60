"""Layer 2: per-example gradients of the user's loss, materialised in chunks or matrix-free."""
from jaxprune.signals.gradients import (DenseOperator, GradientOperator, LossFn, MatrixFreeOperator,
                                        add_gradient_noise, batch_size, classification_loss, dense_operator,
                                        gradient_operator, grads_and_projections, per_example_grads)

__all__ = ["DenseOperator", "GradientOperator", "LossFn", "MatrixFreeOperator", "add_gradient_noise", "batch_size",
           "classification_loss", "dense_operator", "gradient_operator", "grads_and_projections",
           "per_example_grads"]
