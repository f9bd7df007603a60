"""Layer 4: channel groups traced from the jaxpr, surgery on them, BatchNorm folding, importances, units.

The tracer is three pieces: :mod:`.index_space` (a union-find over array axes),
:mod:`.walker` (runs a jaxpr over index spaces) and :mod:`.rules` (the per-primitive rule
table, extensible with :func:`~jaxprune.structure.rules.register_rule`); :mod:`.trace` collects
the groups.
"""
from jaxprune.structure.channel_groups import ChannelGroups, Group, Member, NormLink, make_group
from jaxprune.structure.importance import magnitude_importance, random_importance, taylor_grads, taylor_importance
from jaxprune.structure.surgery import (channel_masks, fold_batchnorm, fuse_channels, select_channels,
                                        shrink_channels, write_channels)
from jaxprune.structure.size import ModelSize, SizeReport, measure_size, size_report
from jaxprune.structure.trace import groups
from jaxprune.structure.units import OutputNorm, Unit, make_unit, two_layer_units

__all__ = ["ChannelGroups", "Group", "Member", "NormLink", "make_group", "magnitude_importance", "random_importance",
           "taylor_grads", "taylor_importance", "channel_masks", "fold_batchnorm", "fuse_channels",
           "select_channels", "shrink_channels", "write_channels", "groups", "OutputNorm", "Unit", "make_unit",
           "two_layer_units", "ModelSize", "SizeReport", "measure_size", "size_report"]
