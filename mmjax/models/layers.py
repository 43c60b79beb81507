"""Transformer layers shared by every family: attention, MLPs, norms, pre-LN block, stack.

Every parameter carries logical axis names (`embed`, `heads`, `kv`, `mlp`, `layers`)
that `mmjax.sharding.LOGICAL_AXIS_RULES` maps onto the mesh. Activations are
constrained with `act_*` names. Compute runs in `dtype`, parameters stay in
`param_dtype` (float32), softmax and layer norms in float32.
"""

from typing import Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = jnp.dtype
# The variable collection of diagnostics that layers sow when it is mutable in an `apply`
# (only then: otherwise, and in `init`, they compute nothing extra and the variables hold no
# such collection), e.g. `apply(..., mutable=[DIAGNOSTICS])`.
DIAGNOSTICS = 'diagnostics'


def freeze_dict_fields(module: nn.Module, *names: str) -> None:
  """Makes the dict fields `names` of `module` `FrozenDict`s, so that the module hashes and can
  be a static argument of `jax.jit` (as `mmjax.generate` takes it). Call it in the module's
  `__post_init__`, before `super().__post_init__()`."""
  for name in names:
    object.__setattr__(module, name, flax.core.FrozenDict(getattr(module, name)))


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
    'silu': jax.nn.silu,
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


class RMSNorm(nn.Module):
  """Root-mean-square norm over the last axis (Llama): `x / rms(x) * scale`, in float32.

  `[..., width]` -> `[..., width]` in `dtype`; no mean subtraction, no bias.
  """
  eps: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                             ('embed',)),
                       (x.shape[-1],), jnp.float32)
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
    return (x * scale).astype(self.dtype)


class HeadLayerNorm(nn.Module):
  """LayerNorm over `head_dim` with a scale and bias per head (QK-norm; HF `ChameleonLayerNorm`).

  `[batch, length, heads, head_dim]` -> same shape and dtype; the moments are those of each
  head's own `head_dim` channels, computed in float32, and head h's channels are then
  scaled and shifted by `scale[h]`, `bias[h]` (`[heads, head_dim]` each).
  """
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x):
    shape = x.shape[-2:]
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                             ('heads', 'kv')), shape, jnp.float32)
    bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                           ('heads', 'kv')), shape, jnp.float32)
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    variance = jnp.square(x32 - mean).mean(-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(variance + self.eps) * scale + bias).astype(x.dtype)


def apply_rotary(x, positions, theta: float):
  """Rotary position embedding, Hugging Face Llama's "rotate half" layout.

  `x [batch, length, heads, head_dim]`, `positions [batch, length]` int -> same shape and
  dtype as x. Channel i of the first half and channel i of the second half form the pair
  rotated by the angle `position * theta ** (-2i / head_dim)` (computed in float32).
  """
  head_dim = x.shape[-1]
  inverse_frequencies = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  angles = positions.astype(jnp.float32)[..., None] * inverse_frequencies  # [b, l, head_dim/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  first, second = jnp.split(x32, 2, axis=-1)
  rotated_half = jnp.concatenate([-second, first], axis=-1)
  return (x32 * jnp.cos(angles) + rotated_half * jnp.sin(angles)).astype(x.dtype)


def causal_mask(length: int, keys: int | None = None, first_slot=0) -> jax.Array:
  """`[1, 1, length, keys]` boolean mask (keys default: length): query i, in slot
  `first_slot + i` (an int or int32 scalar, e.g. a KV cache index), sees key slots up to its own.
  """
  query_slots = first_slot + jnp.arange(length)
  key_slots = jnp.arange(length if keys is None else keys)
  return (key_slots[None, :] <= query_slots[:, None])[None, None]


class Attention(nn.Module):
  """Multi-head or grouped-query dot-product attention; self-attention or cross-attention.

  `x [batch, length, width]` -> `[batch, length, width]`. Queries come from `x`; keys and
  values from `context [batch, context_length, width]` when given (cross-attention, which
  cannot be `causal`), else from `x`. `mask` is boolean, broadcastable to
  `[batch, heads, length, keys]`, True where a query may attend to a key; `kv_mask
  [batch, keys]` is True for real keys (False: padding).

  `num_kv_heads` < `num_heads` shares each key/value head among `num_heads / num_kv_heads`
  query heads (GQA; query head h reads key/value head h // group, as HF's `repeat_kv`).
  `rope_theta` rotates queries and keys by `positions [batch, length]` (`apply_rotary`;
  default `arange(length)`, offset by `cache_index` with a cache). `qk_norm` normalises
  queries and keys per head (`HeadLayerNorm`, params `query_norm`, `key_norm`) after their
  projections and before the rotation, as Chameleon (its keys enter the cache normalised).

  With the `DIAGNOSTICS` collection mutable, each call sows `max_attention_logit [batch]`:
  the largest pre-softmax logit `q.k / sqrt(head_dim)` over heads, queries and the keys each
  query may see (the growth that QK-norm prevents, Chameleon section 2.3).

  KV cache (causal self-attention only): `cache = {'key', 'value'}`, each
  `[batch, max_len, num_kv_heads, head_dim]`; this call's keys and values are written at
  slots `cache_index ...` and its queries attend to every slot up to their own
  (`keys = max_len`). Then the call returns `(output, new_cache)` instead of `output`.
  """
  num_heads: int
  causal: bool = False
  dtype: Dtype = jnp.float32
  num_kv_heads: int | None = None
  head_dim: int | None = None
  use_bias: bool = True
  rope_theta: float | None = None
  qk_norm: bool = False

  @nn.compact
  def __call__(self, x, mask=None, context=None, *, positions=None, kv_mask=None, cache=None,
               cache_index=None):
    width = x.shape[-1]
    num_kv_heads = self.num_kv_heads or self.num_heads
    if self.head_dim is None and width % self.num_heads:
      raise ValueError(f'width {width} is not divisible by num_heads {self.num_heads}')
    if self.num_heads % num_kv_heads:
      raise ValueError(f'num_heads {self.num_heads} is not a multiple of num_kv_heads '
                       f'{num_kv_heads}')
    if context is not None and (self.causal or self.rope_theta is not None or cache is not None):
      raise ValueError('causal attention, rotary positions and the KV cache need keys from x '
                       'itself, not from a context')
    if cache is not None and not self.causal:
      raise ValueError('the KV cache is for causal self-attention')
    context = x if context is None else context
    head_dim = self.head_dim or width // self.num_heads
    project_in = lambda heads, name: Dense(
        (heads, head_dim), ('embed', 'heads', 'kv'), use_bias=self.use_bias, dtype=self.dtype,
        name=name)
    q = project_in(self.num_heads, 'query')(x)
    k = project_in(num_kv_heads, 'key')(context)
    v = project_in(num_kv_heads, 'value')(context)
    if self.qk_norm:
      q = HeadLayerNorm(name='query_norm')(q)
      k = HeadLayerNorm(name='key_norm')(k)
    heads_axes = ('act_batch', 'act_length', 'act_heads', None)
    q = nn.with_logical_constraint(q, heads_axes)
    k = nn.with_logical_constraint(k, heads_axes)
    v = nn.with_logical_constraint(v, heads_axes)

    first_slot = 0 if cache is None else cache_index
    if self.rope_theta is not None:
      if positions is None:
        positions = first_slot + jnp.arange(x.shape[1])[None]
      q = apply_rotary(q, positions, self.rope_theta)
      k = apply_rotary(k, positions, self.rope_theta)
    if cache is not None:
      write = lambda stored, new: nn.with_logical_constraint(
          jax.lax.dynamic_update_slice_in_dim(stored, new.astype(stored.dtype), first_slot, 1),
          heads_axes)
      cache = {'key': write(cache['key'], k), 'value': write(cache['value'], v)}
      k, v = cache['key'].astype(self.dtype), cache['value'].astype(self.dtype)

    if self.causal:
      sees = causal_mask(x.shape[1], k.shape[1], first_slot)
      mask = sees if mask is None else mask & sees
    if kv_mask is not None:
      mask = kv_mask[:, None, None, :] if mask is None else mask & kv_mask[:, None, None, :]

    batch, length, keys = x.shape[0], x.shape[1], k.shape[1]
    groups = self.num_heads // num_kv_heads
    q = q.reshape(batch, length, num_kv_heads, groups, head_dim)
    logits = jnp.einsum('bqkgd,bskd->bkgqs', q, k).astype(jnp.float32) / jnp.sqrt(head_dim)
    logits = logits.reshape(batch, self.num_heads, length, keys)
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    if self.is_mutable_collection(DIAGNOSTICS) and not self.is_initializing():
      self.sow(DIAGNOSTICS, 'max_attention_logit', jnp.max(logits, axis=(1, 2, 3)))
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    weights = weights.reshape(batch, num_kv_heads, groups, length, keys)
    out = jnp.einsum('bkgqs,bskd->bqkgd', weights, v).reshape(batch, length, self.num_heads,
                                                              head_dim)
    out = nn.with_logical_constraint(out, heads_axes)
    out = Dense(width, ('heads', 'kv', 'embed'), in_dims=2, use_bias=self.use_bias,
                dtype=self.dtype, name='out')(out)
    return out if cache is None else (out, cache)


class Mlp(nn.Module):
  """`[..., width]` -> `[..., width]` through a hidden layer of `hidden` units."""
  hidden: int
  activation: str = 'gelu'
  dtype: Dtype = jnp.float32
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    h = Dense(self.hidden, ('embed', 'mlp'), use_bias=self.use_bias, dtype=self.dtype,
              name='fc_in')(x)
    h = nn.with_logical_constraint(h, ('act_batch', 'act_length', 'act_mlp'))
    h = ACTIVATIONS[self.activation](h)
    return Dense(width, ('mlp', 'embed'), use_bias=self.use_bias, dtype=self.dtype,
                 name='fc_out')(h)


class GatedMlp(nn.Module):
  """Gated MLP without biases (SwiGLU for 'silu'): `down(activation(gate(x)) * up(x))`.

  `[..., width]` -> `[..., width]` through `hidden` units.
  """
  hidden: int
  activation: str = 'silu'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    project_in = lambda name: Dense(self.hidden, ('embed', 'mlp'), use_bias=False,
                                    dtype=self.dtype, name=name)
    h = ACTIVATIONS[self.activation](project_in('gate')(x)) * project_in('up')(x)
    h = nn.with_logical_constraint(h, ('act_batch', 'act_length', 'act_mlp'))
    return Dense(width, ('mlp', 'embed'), use_bias=False, dtype=self.dtype, name='down')(h)


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


def remat_block(block: type[nn.Module], remat: bool | str, scan: bool) -> type[nn.Module]:
  """`block` wrapped in `nn.remat` with the policy `remat` names (True: 'full', False: 'none')."""
  policy_name = {False: 'none', True: 'full'}.get(remat, remat)
  if policy_name not in REMAT_POLICIES:
    raise ValueError(f'remat={remat!r}; use one of {sorted(REMAT_POLICIES)}')
  if policy_name == 'none':
    return block
  return nn.remat(block, prevent_cse=not scan, policy=REMAT_POLICIES[policy_name])


class Transformer(nn.Module):
  """`depth` TransformerBlocks: `[batch, length, width]` -> same shape.

  `scan=True` stacks the block parameters on a leading `layers` axis and compiles one
  block; `scan_unroll` is passed to the scan as `unroll`, which changes the compiled
  program, never the parameters. The default 1 keeps compile time flat in depth; fully
  unrolled (True) the program grows with depth, and XLA:CPU does not copy the stacked
  per-layer activations in and out of its while loops (docs/performance.md).
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
    block = remat_block(TransformerBlock, self.remat, self.scan)
    if self.scan:
      stack = nn.scan(
          block, variable_axes={'params': 0, DIAGNOSTICS: 0}, split_rngs={'params': True},
          in_axes=nn.broadcast, length=self.depth,
          unroll=self.scan_unroll,
          metadata_params={nn.PARTITION_NAME: 'layers'})
      x, _ = stack(name='blocks', **block_kwargs)(x, mask)
    else:
      for i in range(self.depth):
        x, _ = block(name=f'block_{i}', **block_kwargs)(x, mask)
    return x
