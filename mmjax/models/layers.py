"""Transformer layers shared by every family: attention, MLP, pre-LN block, stack.

Every parameter carries logical axis names (`embed`, `heads`, `kv`, `mlp`, `layers`)
that `mmjax.sharding.LOGICAL_AXIS_RULES` maps onto the mesh. Activations are
constrained with `act_*` names. Compute runs in `dtype`, parameters stay in
`param_dtype` (float32), softmax and layer norms in float32.
"""

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = jnp.dtype


def quick_gelu(x):
  """OpenAI CLIP's activation: `x * sigmoid(1.702 x)`."""
  return x * jax.nn.sigmoid(1.702 * x)


def gelu(x):
  """Exact (erf) GELU as PyTorch computes it: `0.5 x (1 + erf(x / sqrt(2)))`.

  Equal to `jax.nn.gelu(x, approximate=False)` to float32 rounding (both within ~1e-6 of
  torch's); that one is written with `erfc`, which XLA:CPU expands into exp-based
  polynomials costing ~2x the forward time of erf's (experiments/bench_clip_step.py).
  """
  return 0.5 * x * (1.0 + jax.lax.erf(x * np.sqrt(0.5).astype(x.dtype)))


ACTIVATIONS: dict[str, Callable] = {
    'gelu': gelu,
    'gelu_tanh': lambda x: nn.gelu(x, approximate=True),
    'quick_gelu': quick_gelu,
}


class Dense(nn.Module):
  """`[..., *in_shape]` -> `[..., *features]`, contracting the last `in_dims` input axes.

  The kernel is `[*in_shape, *features]` and its axes carry the logical names `axes`;
  the bias `[*features]` carries the last `len(features)` of them.
  `kernel_init` is an initializer factory taking `in_axis`/`out_axis` (the fan-in and
  fan-out axes of a multi-axis kernel), e.g. `nn.initializers.xavier_uniform`.
  """
  features: int | tuple[int, ...]
  axes: tuple[str | None, ...]
  in_dims: int = 1
  use_bias: bool = True
  kernel_init: Callable = nn.initializers.xavier_uniform
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    in_shape = x.shape[x.ndim - self.in_dims:]
    in_axes = tuple(range(self.in_dims))
    out_axes = tuple(range(self.in_dims, self.in_dims + len(features)))
    init = self.kernel_init(in_axis=in_axes, out_axis=out_axes)
    kernel = self.param('kernel', nn.with_logical_partitioning(init, self.axes),
                        in_shape + features, jnp.float32)
    y = jnp.tensordot(x.astype(self.dtype), kernel.astype(self.dtype),
                      axes=(tuple(range(x.ndim - self.in_dims, x.ndim)), in_axes))
    if self.use_bias:
      bias = self.param(
          'bias', nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                               self.axes[-len(features):]),
          features, jnp.float32)
      y = y + bias.astype(self.dtype)
    return y


def layer_norm(eps: float, name=None):
  """LayerNorm over `embed`, computed in float32."""
  return nn.LayerNorm(
      epsilon=eps, dtype=jnp.float32, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ('embed',)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ('embed',)))


def causal_mask(length: int) -> jax.Array:
  """`[1, 1, length, length]` boolean mask: query i sees keys 0..i."""
  return jnp.tril(jnp.ones((length, length), bool))[None, None]


class Attention(nn.Module):
  """Multi-head dot-product attention: self-attention, or cross-attention to `context`.

  `x [batch, length, width]` -> `[batch, length, width]`. Queries come from `x`; keys and
  values from `context [batch, context_length, width]` when given (cross-attention, which
  cannot be `causal`), else from `x`. `mask` is boolean, broadcastable to
  `[batch, heads, length, context_length]`, True where a query may attend to a key.
  """
  num_heads: int
  causal: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None, context=None):
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f'width {width} is not divisible by num_heads {self.num_heads}')
    if self.causal and context is not None:
      raise ValueError('causal attention needs keys from x itself, not from a context')
    context = x if context is None else context
    head_dim = width // self.num_heads
    project_in = lambda name: Dense(
        (self.num_heads, head_dim), ('embed', 'heads', 'kv'), dtype=self.dtype, name=name)
    q, k, v = project_in('query')(x), project_in('key')(context), project_in('value')(context)
    q = nn.with_logical_constraint(q, ('act_batch', 'act_length', 'act_heads', None))
    k = nn.with_logical_constraint(k, ('act_batch', 'act_length', 'act_heads', None))
    v = nn.with_logical_constraint(v, ('act_batch', 'act_length', 'act_heads', None))

    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32) / jnp.sqrt(head_dim)
    if self.causal:
      mask = causal_mask(x.shape[1]) if mask is None else mask & causal_mask(x.shape[1])
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum('bhqk,bkhd->bqhd', weights, v)
    out = nn.with_logical_constraint(out, ('act_batch', 'act_length', 'act_heads', None))
    return Dense(width, ('heads', 'kv', 'embed'), in_dims=2, dtype=self.dtype, name='out')(out)


class Mlp(nn.Module):
  """`[..., width]` -> `[..., width]` through a hidden layer of `hidden` units."""
  hidden: int
  activation: str = 'gelu'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    h = Dense(self.hidden, ('embed', 'mlp'), dtype=self.dtype, name='fc_in')(x)
    h = nn.with_logical_constraint(h, ('act_batch', 'act_length', 'act_mlp'))
    h = ACTIVATIONS[self.activation](h)
    return Dense(width, ('mlp', 'embed'), dtype=self.dtype, name='fc_out')(h)


class TransformerBlock(nn.Module):
  """Pre-LN residual block: `x + attn(ln(x))`, then `x + mlp(ln(x))`.

  Takes and returns `(x, None)` so that `nn.scan` can stack it; x is `[batch, length, width]`.
  """
  num_heads: int
  mlp_dim: int
  causal: bool = False
  activation: str = 'gelu'
  layer_norm_eps: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None):
    constrain = lambda y: nn.with_logical_constraint(y, ('act_batch', 'act_length', 'act_embed'))
    x = constrain(x)
    h = layer_norm(self.layer_norm_eps, name='ln_attn')(x).astype(self.dtype)
    x = constrain(x + Attention(self.num_heads, self.causal, self.dtype, name='attn')(h, mask))
    h = layer_norm(self.layer_norm_eps, name='ln_mlp')(x).astype(self.dtype)
    x = constrain(x + Mlp(self.mlp_dim, self.activation, self.dtype, name='mlp')(h))
    return x, None


# Rematerialisation policies by name: what the backward pass may keep from the forward.
REMAT_POLICIES = {
    'none': None,  # no remat at all
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Transformer(nn.Module):
  """`depth` TransformerBlocks: `[batch, length, width]` -> same shape.

  `scan=True` stacks the block parameters on a leading `layers` axis and compiles one
  block; `scan_unroll` is passed to the scan as `unroll`, which changes the compiled
  program, never the parameters. The default 1 keeps compile time flat in depth; fully
  unrolled (True), XLA:CPU stops copying the stacked per-layer activations in and out of its
  while loops (~20% of a train step of `configs/clip.py:tiny`,
  experiments/bench_clip_step.py) but the program grows with depth.
  `remat` picks what the backward pass recomputes (see `REMAT_POLICIES`): 'none' keeps
  every activation, 'full' (or True) only each block's input, 'dots' keeps matmul outputs,
  'dots_no_batch' keeps matmul outputs without batch dimensions (weights-only products, as
  in MaxText).
  """
  depth: int
  num_heads: int
  mlp_dim: int
  causal: bool = False
  activation: str = 'gelu'
  layer_norm_eps: float = 1e-5
  scan: bool = True
  scan_unroll: int | bool = 1
  remat: bool | str = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None):
    block_kwargs = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, causal=self.causal,
                        activation=self.activation, layer_norm_eps=self.layer_norm_eps,
                        dtype=self.dtype)
    block = TransformerBlock
    policy_name = {False: 'none', True: 'full'}.get(self.remat, self.remat)
    if policy_name not in REMAT_POLICIES:
      raise ValueError(f'remat={self.remat!r}; use one of {sorted(REMAT_POLICIES)}')
    if policy_name != 'none':
      block = nn.remat(block, prevent_cse=not self.scan, policy=REMAT_POLICIES[policy_name])
    if self.scan:
      stack = nn.scan(
          block, variable_axes={'params': 0}, split_rngs={'params': True},
          in_axes=nn.broadcast, length=self.depth,
          unroll=self.scan_unroll,
          metadata_params={nn.PARTITION_NAME: 'layers'})
      x, _ = stack(name='blocks', **block_kwargs)(x, mask)
    else:
      for i in range(self.depth):
        x, _ = block(name=f'block_{i}', **block_kwargs)(x, mask)
    return x
