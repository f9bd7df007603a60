"""The one pruner registry: method names -> callables of one protocol, for sweeps and the gradual driver.

An unstructured pruner is ``pruner(params, batch, k, *, key, loss_fn=None, w_ref=None) ->
PruneResult``; a structured pruner is ``pruner(params, groups, sparsity, *, key, apply_fn=None,
batch=None) -> ChannelResult`` (mask mode, so sweeps can evaluate the same model). Users add
their own with :func:`register`; :func:`pruner_for` binds options to a registered method.
"""
from __future__ import annotations

from typing import Callable

Pruner = Callable[..., object]

UNSTRUCTURED: dict[str, Callable[..., Pruner]] = {}
STRUCTURED: dict[str, Callable[..., Pruner]] = {}


def register(name: str, make: Callable[..., Pruner], *, structured: bool = False) -> None:
  """Registers ``make(**options) -> pruner`` under ``name``."""
  if not isinstance(name, str) or not callable(make):
    raise TypeError("register(name: str, make: callable(**options) -> pruner)")
  (STRUCTURED if structured else UNSTRUCTURED)[name] = make


def pruner_for(name: str, **options) -> Pruner:
  """The registered method ``name`` with ``options`` bound (e.g. ``pruner_for("ewr", stages=10)``)."""
  table = UNSTRUCTURED if name in UNSTRUCTURED else STRUCTURED
  if name not in table:
    raise ValueError(f"pruner: unknown method {name!r}; registered: {sorted(UNSTRUCTURED) + sorted(STRUCTURED)}")
  return table[name](**options)


def _magnitude(scope="global", **options):
  from jaxprune.methods._baselines import magnitude
  return lambda params, batch, k, *, key=None, loss_fn=None, w_ref=None: magnitude(params, k, scope=scope, **options)


def _random(**options):
  from jaxprune.methods._baselines import random
  return lambda params, batch, k, *, key, loss_fn=None, w_ref=None: random(params, k, key=key, **options)


def _regression(name):
  """``lr``/``ewr`` for the gradual driver: one stage per call by default (the driver's schedule
  is the stages); the driver's dense ``w_ref`` is used only by the fixed-reference reading
  (``reset_reference=False``, official), the default resets the reference to the current weights."""
  def make(**options):
    from jaxprune.core.options import resolve
    from jaxprune.methods._ewr import EWROptions, ewr, lr
    fn = ewr if name == "ewr" else lr
    options.setdefault("show_progress", False)
    if options.get("options") is None:
      options.setdefault("stages", 1)
    fields = {f: options[f] for f in EWROptions.__dataclass_fields__ if f in options}
    fixed_reference = not resolve(EWROptions, options.get("options"), options.get("official", False),
                                  fields).reset_reference
    return lambda params, batch, k, *, key=None, loss_fn=None, w_ref=None: fn(
        params, batch, k, loss_fn=loss_fn, key=key, w_ref=w_ref if fixed_reference else None, **options)
  return make


def _structured(name, **fixed):
  def make(**options):
    from jaxprune.methods import _channels, _intrafusion, _ispasp
    fn = {"prune_channels": _channels.prune_channels, "intra_fusion": _intrafusion.intra_fusion,
          "ispasp": _ispasp.ispasp}[name]
    kw = {"mode": "mask", "show_progress": False, **fixed, **options}
    return lambda params, groups, sparsity, *, key=None, apply_fn=None, batch=None: fn(
        params, groups, sparsity, apply_fn=apply_fn, batch=batch, **({"key": key} if name != "ispasp" else {}), **kw)
  return make


register("magnitude", _magnitude)
register("magnitude_layer", lambda **o: _magnitude(scope="layer", **o))
register("random", _random)
register("lr", _regression("lr"))
register("ewr", _regression("ewr"))
register("channels_l1", _structured("prune_channels", importance="l1"), structured=True)
register("intra_fusion", _structured("intra_fusion", importance="l1"), structured=True)
register("ispasp", _structured("ispasp"), structured=True)
