"""jaxprune: pruning methods as pure functions over Flax parameter pytrees."""
from jaxprune import data, models
from jaxprune.core import trees, masks
from jaxprune.methods._baselines import magnitude, random, uniform_allocation
from jaxprune.core.budget import k_from_sparsity, sparsity_from_k
from jaxprune.checkpoints import load_mlpnet, load_resnet, load_resnet20
from jaxprune.training.evaluate import Evaluation, evaluate
from jaxprune.methods import _ewr as ewr_module  # the module (the name ewr is the function)
from jaxprune.methods._ewr import ewr, lr
from jaxprune import ot, signals
from jaxprune.signals.gradients import classification_loss, gradient_operator, per_example_grads, add_gradient_noise
from jaxprune.core.schedules import sparsity_schedule, polynomial_sparsity
from jaxprune.training.gradual import GradualResult, MaskedState, gradual_prune, keep_pruned_at_zero, masks_from_zeros, pruner_for, set_masks
from jaxprune.core.masks import (SparsityReport, apply_masks, check_masks, count_kept, masks_like, sparsity_report,
                            topk_mask)
from jaxprune.core.results import PruneResult
from jaxprune.structure.channel_groups import ChannelGroups, Group, Member, NormLink, make_group
from jaxprune.structure.trace import groups
from jaxprune.structure.surgery import (channel_masks, fold_batchnorm, fuse_channels, select_channels, shrink_channels,
                              write_channels)
from jaxprune.structure.importance import magnitude_importance, random_importance, taylor_grads, taylor_importance
from jaxprune.methods._channels import ChannelResult, prune_channels
from jaxprune.methods._intrafusion import FusionMap, intra_fusion
from jaxprune.methods import _recovery as recovery
from jaxprune.methods._recovery import OutputNorm, RecoveryOptions, Support, recover_support
from jaxprune.structure.units import Unit, make_unit, two_layer_units
from jaxprune.methods._ispasp import ispasp, ispasp_sweep
from jaxprune.core.trees import (FlatSpec, Prunable, count_prunable, flatten, is_kernel, leaves_with_paths,
                            prunable_paths, unflatten)

__version__ = "0.1.0"

__all__ = [
    "magnitude", "random", "uniform_allocation", "ewr", "lr", "ewr_module",
    "per_example_grads", "gradient_operator", "add_gradient_noise", "classification_loss",
    "sparsity_schedule", "polynomial_sparsity", "ot", "signals",
    "keep_pruned_at_zero", "set_masks", "masks_from_zeros", "MaskedState", "gradual_prune", "GradualResult", "pruner_for",
    "k_from_sparsity", "sparsity_from_k",
    "Prunable", "is_kernel", "prunable_paths", "count_prunable", "flatten", "unflatten", "FlatSpec",
    "leaves_with_paths",
    "apply_masks", "check_masks", "masks_like", "count_kept", "topk_mask", "sparsity_report", "SparsityReport",
    "PruneResult", "evaluate", "Evaluation",
    "load_mlpnet", "load_resnet", "load_resnet20",
    "data", "models",
    "groups", "ChannelGroups", "Group", "Member", "NormLink", "make_group",
    "fold_batchnorm", "select_channels", "fuse_channels", "write_channels", "shrink_channels", "channel_masks",
    "magnitude_importance", "taylor_importance", "random_importance", "taylor_grads",
    "prune_channels", "ChannelResult", "intra_fusion", "FusionMap",
    "ispasp", "ispasp_sweep", "recover_support", "RecoveryOptions", "Support", "OutputNorm", "recovery",
    "Unit", "make_unit", "two_layer_units",
]
