"""jaxprune: pruning methods as pure functions over Flax parameter pytrees."""
from jaxprune import data, models
from jaxprune.baselines import magnitude, random, uniform_allocation
from jaxprune.budget import k_from_sparsity, sparsity_from_k
from jaxprune.checkpoints import load_mlpnet, load_resnet, load_resnet20
from jaxprune.evaluate import Evaluation, evaluate
import jaxprune.ewr as ewr_module  # the module (the name ewr is the function)
from jaxprune.ewr import ewr, lr
from jaxprune import ot, signals
from jaxprune.signals import classification_loss, gradient_operator, per_example_grads, add_gradient_noise
from jaxprune.schedules import sparsity_schedule, polynomial_sparsity
from jaxprune.loops import GradualResult, MaskedState, gradual_prune, keep_pruned_at_zero, masks_from_zeros, pruner_for, set_masks
from jaxprune.masks import (SparsityReport, apply_masks, check_masks, count_kept, masks_like, sparsity_report,
                            topk_mask)
from jaxprune.result import PruneResult
from jaxprune.channel_groups import ChannelGroups, Group, Member, NormLink, make_group
from jaxprune.tracing import groups
from jaxprune.surgery import (channel_masks, fold_batchnorm, fuse_channels, select_channels, shrink_channels,
                              write_channels)
from jaxprune.importance import magnitude_importance, random_importance, taylor_grads, taylor_importance
from jaxprune.channels import ChannelResult, prune_channels
from jaxprune.intrafusion import FusionMap, intra_fusion
from jaxprune import recovery
from jaxprune.recovery import OutputNorm, RecoveryOptions, Support, recover_support
from jaxprune.units import Unit, make_unit, two_layer_units
from jaxprune.ispasp import ispasp, ispasp_sweep
from jaxprune.trees import (FlatSpec, Prunable, count_prunable, flatten, is_kernel, leaves_with_paths,
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
