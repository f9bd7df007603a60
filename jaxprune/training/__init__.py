"""Layer 6: optax masking, the gradual driver, the pruner registry, training and evaluation helpers."""
