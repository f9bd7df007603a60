"""Evaluating a traced program equation by equation, with hooks at chosen equations.

Units read the activation that enters an equation (:func:`jaxprune.structure.units.capture_at`);
repair reads and rewrites the value an equation produces (:func:`jaxprune.repair`). Both run the
model's jaxpr here: primitives are bound one by one, so the evaluation works on concrete arrays
and under ``jax.jit``/``jax.vmap`` alike, for pure JAX, linen and NNX programs. An *address* is
an equation's position, with indices through the nested sub-jaxprs (``jit``, ``custom_jvp``...)
that :func:`jaxprune.structure.walker.subjaxpr` opens.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax.extend as jex

from jaxprune.structure.walker import subjaxpr

InputHook = Callable[[tuple, list], None]            # (address, input values) -> None
OutputHook = Callable[[tuple, list], list]           # (address, output values) -> output values


def evaluate(jaxpr, consts, args, addresses: frozenset, *, on_inputs: Optional[InputHook] = None,
             on_outputs: Optional[OutputHook] = None, prefix: tuple = ()) -> list:
  """The outputs of ``jaxpr`` on ``args``, calling the hooks at each equation in ``addresses``.

  Sub-jaxprs are entered only when they hold an address (elsewhere the call is bound whole).
  ``on_inputs`` may raise to stop the evaluation early; ``on_outputs`` returns the values the
  rest of the program sees (the hook may change them).
  """
  env = {}

  def read(v):
    return v.val if isinstance(v, jex.core.Literal) else env[v]

  for v, val in zip(jaxpr.constvars, consts):
    env[v] = val
  for v, val in zip(jaxpr.invars, args):
    env[v] = val
  for i, eqn in enumerate(jaxpr.eqns):
    address = prefix + (i,)
    invals = [read(v) for v in eqn.invars]
    if on_inputs is not None and address in addresses:
      on_inputs(address, invals)
    sub = subjaxpr(eqn)
    if sub is not None and any(a[:len(address)] == address and len(a) > len(address) for a in addresses):
      outvals = evaluate(sub[0], sub[1], invals, addresses, on_inputs=on_inputs, on_outputs=on_outputs,
                         prefix=address)
    else:
      outvals = bind(eqn, invals)
    if on_outputs is not None and address in addresses:
      outvals = on_outputs(address, outvals)
    for v, val in zip(eqn.outvars, outvals):
      env[v] = val
  return [read(v) for v in jaxpr.outvars]


def bind(eqn, invals: list) -> list:
  """Runs one equation on ``invals``; always a list of outputs."""
  bound = eqn.primitive.get_bind_params(eqn.params)   # params (jax >= 0.7) or (subfuns, params)
  subfuns, params = bound if isinstance(bound, tuple) else ((), bound)
  with eqn.ctx.manager:
    outvals = eqn.primitive.bind(*subfuns, *invals, **params)
  return list(outvals) if eqn.primitive.multiple_results else [outvals]
