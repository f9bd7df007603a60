"""jaxprune: pruning methods as pure functions over Flax parameter pytrees.

The package face: every public name lives in one of the layer folders (``core``, ``signals``,
``ot``, ``structure``, ``methods``, ``training``) or the edges (``data``, ``models``,
``checkpoints``, ``cli``) and is re-exported here. One call shape for every method::

    magnitude(params, k)                    random(params, k, *, key)
    ewr(params, batch, k, *, ...)           lr(params, batch, k, *, ...)
    prune_channels(params, groups, sparsity, *, ...)
    intra_fusion(params, groups, sparsity, *, ...)
    ispasp(params, groups, sparsity, *, apply_fn, batch, ...)
    repair(apply_fn, dense_params, result, x, ...)
"""
from jaxprune import data, models, ot, signals
from jaxprune.checkpoints import load_mlpnet, load_resnet, load_resnet20
from jaxprune.core import masks, trees
from jaxprune.core.budget import k_from_sparsity, n_kept_channels, sparsity_from_k
from jaxprune.core.forms import classification_loss, register_resize_rule, resized_module
from jaxprune.core.masks import (SparsityReport, apply_masks, check_masks, count_kept, masks_like, sparsity_report,
                                 topk_mask)
from jaxprune.core.results import ChannelResult, PruneResult
from jaxprune.core.schedules import polynomial_sparsity, sparsity_schedule
from jaxprune.core.trees import (FlatSpec, Prunable, count_prunable, flatten, is_kernel, leaves_with_paths,
                                 prunable_paths, unflatten)
from jaxprune.methods import (ChannelOptions, EWROptions, FusionMap, IntraFusionOptions, ISpaSPOptions,
                              MagnitudeOptions, RecoveryOptions, Support, ewr, intra_fusion, ispasp, ispasp_sweep,
                              lr, magnitude, prune_channels, random, recover_support, uniform_allocation,
                              repair, RepairOptions, LayerReport, reestimate_batchnorm)
from jaxprune.signals import add_gradient_noise, gradient_operator, per_example_grads
from jaxprune.structure import (ChannelGroups, Group, Member, NormLink, OutputNorm, Unit, channel_masks,
                                fold_batchnorm, fuse_channels, groups, magnitude_importance, make_group, make_unit,
                                random_importance, select_channels, shrink_channels, taylor_grads, taylor_importance,
                                two_layer_units, write_channels, ModelSize, SizeReport, measure_size, size_report)
from jaxprune.training import (GradualResult, MaskedState, evaluate, Evaluation, gradual_prune, keep_pruned_at_zero,
                               masks_from_zeros, pruner_for, register, set_masks)

__version__ = "0.2.0"

__all__ = [
    # unstructured methods and their options
    "magnitude", "random", "ewr", "lr", "MagnitudeOptions", "EWROptions", "uniform_allocation",
    # structured methods and their options
    "prune_channels", "intra_fusion", "ispasp", "ispasp_sweep", "ChannelOptions", "IntraFusionOptions",
    "ISpaSPOptions", "FusionMap", "recover_support", "RecoveryOptions", "Support",
    # statistics repair after structured pruning
    "repair", "RepairOptions", "LayerReport", "reestimate_batchnorm",
    # results, budgets, masks, trees
    "PruneResult", "ChannelResult", "k_from_sparsity", "sparsity_from_k", "n_kept_channels",
    "apply_masks", "check_masks", "masks_like", "count_kept", "topk_mask", "sparsity_report", "SparsityReport",
    "Prunable", "is_kernel", "prunable_paths", "count_prunable", "flatten", "unflatten", "FlatSpec",
    "leaves_with_paths", "sparsity_schedule", "polynomial_sparsity",
    # signals
    "per_example_grads", "gradient_operator", "add_gradient_noise", "classification_loss",
    # structure
    "groups", "ChannelGroups", "Group", "Member", "NormLink", "make_group", "fold_batchnorm", "select_channels",
    "fuse_channels", "write_channels", "shrink_channels", "channel_masks", "magnitude_importance",
    "taylor_importance", "random_importance", "taylor_grads", "Unit", "make_unit", "two_layer_units", "OutputNorm",
    "size_report", "measure_size", "SizeReport", "ModelSize", "resized_module", "register_resize_rule",
    # training
    "keep_pruned_at_zero", "set_masks", "masks_from_zeros", "MaskedState", "gradual_prune", "GradualResult",
    "pruner_for", "register", "evaluate", "Evaluation",
    # edges and modules
    "load_mlpnet", "load_resnet", "load_resnet20", "data", "models", "ot", "signals", "trees", "masks",
]
