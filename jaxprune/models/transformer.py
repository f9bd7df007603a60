"""A small pre-LN transformer classifier over token sequences, with per-block widths.

Every width a structured method can change is read back from the arrays by
:meth:`Transformer.from_params`: the residual width, and per block the query heads, the
key/value heads (grouped-query attention when fewer), the query/key and value dimensions per
head and the MLP width. Attention is written with ``DenseGeneral`` layers named ``query``,
``key``, ``value`` and ``out`` (kernels ``(d, heads, head_dim)`` and ``(heads, head_dim, d)``),
so whole heads, per-head dimensions and MLP channels are channel groups of
:func:`jaxprune.groups`. Tokens enter through a one-hot ``Dense`` (``embed``), the producer of the
residual stream (an ``nn.Embed``'s table, read by a gather, is traced as the same producer).
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.models.common import params_of


class BlockWidths(NamedTuple):
  """The widths of one block: query heads, key/value heads, q/k and v dims per head, MLP width."""
  heads: int
  kv_heads: int
  qk_dim: int
  v_dim: int
  mlp: int


class SelfAttention(nn.Module):
  """Multi-head self-attention; ``kv_heads < heads`` shares each key/value head among
  ``heads // kv_heads`` query heads (grouped-query attention). Scores are scaled by
  ``1 / sqrt(qk_dim)`` of the arrays, as Flax's attention does."""
  width: int
  heads: int
  kv_heads: int
  qk_dim: int
  v_dim: int

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    if self.heads % self.kv_heads:
      raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
    q = nn.DenseGeneral((self.heads, self.qk_dim), name="query")(x)
    k = nn.DenseGeneral((self.kv_heads, self.qk_dim), name="key")(x)
    v = nn.DenseGeneral((self.kv_heads, self.v_dim), name="value")(x)
    b, s = x.shape[:2]
    q = q.reshape(b, s, self.kv_heads, self.heads // self.kv_heads, q.shape[-1])
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", q, k) / np.sqrt(q.shape[-1])
    weights = jax.nn.softmax(scores, axis=-1)
    o = jnp.einsum("bhgqk,bkhd->bqhgd", weights, v).reshape(b, s, self.heads, v.shape[-1])
    return nn.DenseGeneral(self.width, axis=(-2, -1), name="out")(o)


class Block(nn.Module):
  """``x + attention(LN(x))``, then ``x + fc2(gelu(fc1(LN(x))))``."""
  width: int
  widths: BlockWidths

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    w = self.widths
    x = x + SelfAttention(self.width, w.heads, w.kv_heads, w.qk_dim, w.v_dim, name="attention")(
        nn.LayerNorm(name="ln1")(x))
    h = nn.gelu(nn.Dense(w.mlp, name="fc1")(nn.LayerNorm(name="ln2")(x)))
    return x + nn.Dense(self.width, name="fc2")(h)


class Transformer(nn.Module):
  """Tokens ``(N, length)`` int -> logits ``(N, num_classes)``: one-hot embedding plus learned
  positions, pre-LN blocks, a final LayerNorm, mean over positions and a ``head`` Dense.

  Attributes:
    vocab, length: token vocabulary and sequence length.
    width: the residual stream's width.
    blocks: one :class:`BlockWidths` per block.
    num_classes: output width.
  """
  vocab: int
  length: int
  width: int
  blocks: Sequence[BlockWidths]
  num_classes: int = 2

  @nn.compact
  def __call__(self, tokens: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    x = nn.Dense(self.width, use_bias=False, name="embed")(jax.nn.one_hot(tokens, self.vocab))
    x = x + self.param("positions", nn.initializers.normal(0.02), (self.length, self.width))
    for i, widths in enumerate(self.blocks):
      x = Block(self.width, BlockWidths(*widths), name=f"block{i}")(x)
    x = nn.LayerNorm(name="ln_final")(x).mean(axis=1)
    return nn.Dense(self.num_classes, name="head")(x)

  @classmethod
  def from_params(cls, variables: Any) -> "Transformer":
    """The transformer whose widths match a (possibly pruned) parameter tree."""
    params = params_of(variables)
    vocab, width = params["embed"]["kernel"].shape
    blocks = []
    for i in range(len([k for k in params.keys() if str(k).startswith("block")])):
      attention = params[f"block{i}"]["attention"]
      _, heads, qk_dim = attention["query"]["kernel"].shape
      _, kv_heads, v_dim = attention["value"]["kernel"].shape
      blocks.append(BlockWidths(int(heads), int(kv_heads), int(qk_dim), int(v_dim),
                                int(params[f"block{i}"]["fc1"]["kernel"].shape[1])))
    return cls(vocab=int(vocab), length=int(params["positions"].shape[0]), width=int(width),
               blocks=tuple(blocks), num_classes=int(params["head"]["kernel"].shape[1]))


def transformer(vocab: int = 16, length: int = 12, width: int = 32, depth: int = 2, heads: int = 4,
                head_dim: int = 8, mlp: int = 64, kv_heads: Optional[int] = None,
                num_classes: int = 2) -> Transformer:
  """A ``depth``-block transformer with ``heads`` heads of ``head_dim`` (``kv_heads`` key/value
  heads, default ``heads``) and an MLP of ``mlp``; the CLI's embedded sequence model."""
  widths = BlockWidths(heads, kv_heads or heads, head_dim, head_dim, mlp)
  return Transformer(vocab=vocab, length=length, width=width, blocks=(widths,) * depth, num_classes=num_classes)
