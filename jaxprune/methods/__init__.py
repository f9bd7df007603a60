"""Layer 5: the pruning methods, private modules behind this face."""
