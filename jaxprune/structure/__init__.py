"""Layer 4: channel groups traced from the jaxpr, surgery on them, BatchNorm folding, importances, units."""
