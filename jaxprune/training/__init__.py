"""Layer 6: optax masking, the gradual driver, the one pruner registry, training and evaluation helpers."""
from jaxprune.training.batches import Dataset, batches
from jaxprune.training.evaluate import Evaluation, evaluate
from jaxprune.training.gradual import GradualResult, Stage, gradual_prune
from jaxprune.training.masking import MaskedState, keep_pruned_at_zero, masks_from_zeros, set_masks
from jaxprune.training.registry import Pruner, pruner_for, register

__all__ = ["Dataset", "batches", "Evaluation", "evaluate", "GradualResult", "Stage", "gradual_prune", "MaskedState",
           "keep_pruned_at_zero", "masks_from_zeros", "set_masks", "Pruner", "pruner_for", "register"]
