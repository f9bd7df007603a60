"""Layer 5: the pruning methods, private modules behind this face.

Each method is a jittable kernel plus a thin host driver, with one frozen options object.
"""
from jaxprune.methods._baselines import MagnitudeOptions, magnitude, random, uniform_allocation
from jaxprune.methods._channels import ChannelOptions, prune_channels
from jaxprune.methods._ewr import EWROptions, ewr, lr
from jaxprune.methods._intrafusion import FusionMap, IntraFusionOptions, intra_fusion
from jaxprune.methods._ispasp import ISpaSPOptions, ispasp, ispasp_sweep
from jaxprune.methods._recovery import RecoveryOptions, Support, recover_support
from jaxprune.methods._repair import LayerReport, RepairOptions, reestimate_batchnorm, repair

__all__ = ["MagnitudeOptions", "magnitude", "random", "uniform_allocation", "ChannelOptions", "prune_channels",
           "EWROptions", "ewr", "lr", "FusionMap", "IntraFusionOptions", "intra_fusion", "ISpaSPOptions", "ispasp",
           "ispasp_sweep", "RecoveryOptions", "Support", "recover_support", "repair", "RepairOptions",
           "LayerReport", "reestimate_batchnorm"]
