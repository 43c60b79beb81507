"""Perceiver resampler: a fixed number of learned latents cross-attending to visual features.

`features [batch, images, tokens, width]` -> `[batch, images, num_latents, width]`: however
many tokens an image has, it comes out as `num_latents` vectors. Each image is resampled on
its own. Per block, queries come from the latents and keys/values from the concatenation
`[features; latents]` (both normed by the block's own norms), then

    latents_normed = norm_latents(latents)
    latents = latents + attn(latents_normed, [norm_features(features); latents_normed])
    latents = latents + mlp(norm_mlp(latents))

and a final norm. The features never change from block to block. With `max_images`, a learned
time (media index) embedding `time_embed[t]` is added to every token of image `t` first.

    resampler = PerceiverResampler(layout='flamingo', num_latents=64, depth=6)
    latents = resampler.apply({'params': params}, features, feature_mask)

The two layouts differ only in these places:

| | 'flamingo' (OpenFlamingo helpers.py) | 'idefics2' (HF Idefics2PerceiverResampler) |
| --- | --- | --- |
| norms (features, latents, mlp, final) | LayerNorm with scale and bias | RMSNorm, scale only |
| `norm_eps` default | 1e-5 (torch LayerNorm) | 1e-6 (HF `rms_norm_eps`) |
| mlp (hidden `mlp_ratio * width`) | Linear, `activation`, Linear | `down(act(gate(x)) * up(x))` |
| `activation` default | 'gelu' (exact) | 'silu' |
| `latents` init | normal(1) (torch.randn) | ones |

In both, attention and mlp projections have no biases, attention is grouped-query when
`num_kv_heads < num_heads` (OpenFlamingo uses `num_kv_heads = num_heads`, the default), and
`feature_mask` masks padded feature tokens only (the latents are always attended to, as in
HF). OpenFlamingo's per-frame embeddings (`max_num_frames`, video) are not implemented.
"""

import flax.linen as nn
import jax.numpy as jnp

from mmjax.models import layers

LAYOUTS = ('flamingo', 'idefics2')
_DEFAULT_ACTIVATION = {'flamingo': 'gelu', 'idefics2': 'silu'}
_DEFAULT_NORM_EPS = {'flamingo': 1e-5, 'idefics2': 1e-6}


def _norm(layout: str, eps: float, dtype: layers.Dtype, name: str):
  """The layout's norm over `embed` as a callable `[..., width]` -> same shape in `dtype`."""
  if layout == 'flamingo':
    layer_norm = layers.layer_norm(eps, name=name)
    return lambda x: layer_norm(x).astype(dtype)
  return layers.RMSNorm(eps, dtype, name=name)


class ResamplerBlock(nn.Module):
  """Latents `[batch, latents, width]` cross-attend to `[features; latents]`, then an mlp.

  `features [batch, tokens, width]`; `kv_mask [batch, tokens + latents]` (True: attend) or
  None. Returns `(latents, None)` so that `nn.scan` can stack it.
  """
  layout: str
  num_heads: int
  head_dim: int
  num_kv_heads: int
  mlp_dim: int
  activation: str
  norm_eps: float
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, latents, features, kv_mask):
    constrain = lambda y: nn.with_logical_constraint(y, ('act_batch', 'act_length', 'act_embed'))
    norm = lambda name: _norm(self.layout, self.norm_eps, self.dtype, name)
    latents_normed = norm('ln_latents')(latents)
    context = jnp.concatenate([norm('ln_features')(features), latents_normed], axis=1)
    attention = layers.Attention(self.num_heads, dtype=self.dtype, num_kv_heads=self.num_kv_heads,
                                 head_dim=self.head_dim, use_bias=False, name='attn')
    latents = constrain(latents + attention(latents_normed, context=constrain(context),
                                            kv_mask=kv_mask))
    if self.layout == 'flamingo':
      mlp = layers.Mlp(self.mlp_dim, self.activation, self.dtype, use_bias=False, name='mlp')
    else:
      mlp = layers.GatedMlp(self.mlp_dim, self.activation, self.dtype, name='mlp')
    return constrain(latents + mlp(norm('ln_mlp')(latents))), None


class ResamplerStack(nn.Module):
  """`depth` ResamplerBlocks over `latents [batch, latents, width]` -> same shape.

  `scan=True` stacks the block parameters on a leading `layers` axis (`blocks`), else they
  are `block_{i}`.
  """
  depth: int
  block: dict
  scan: bool = True

  @nn.compact
  def __call__(self, latents, features, kv_mask):
    if self.scan:
      stack = nn.scan(
          ResamplerBlock, variable_axes={'params': 0}, split_rngs={'params': True},
          in_axes=(nn.broadcast, nn.broadcast), length=self.depth,
          metadata_params={nn.PARTITION_NAME: 'layers'})
      latents, _ = stack(name='blocks', **self.block)(latents, features, kv_mask)
    else:
      for i in range(self.depth):
        latents, _ = ResamplerBlock(name=f'block_{i}', **self.block)(latents, features, kv_mask)
    return latents


class PerceiverResampler(nn.Module):
  """`features [batch, images, tokens, width]` -> `[batch, images, num_latents, width]`.

  A `[batch, tokens, width]` input is one image and gives `[batch, num_latents, width]`.
  `feature_mask` (`features.shape[:-1]`, True for real tokens) marks padding; default all
  real. `width` is the features'. `num_kv_heads`, `activation` and `norm_eps` default to
  `num_heads` and the layout's values (module docstring); the mlp has `mlp_ratio * width`
  hidden units. `max_images` adds learned time embeddings for up to that many images (None:
  none, as OpenFlamingo's default and Idefics2).
  """
  layout: str = 'flamingo'
  num_latents: int = 64
  depth: int = 6
  num_heads: int = 8
  head_dim: int = 64
  num_kv_heads: int | None = None
  mlp_ratio: int = 4
  activation: str | None = None
  norm_eps: float | None = None
  max_images: int | None = None
  scan: bool = True
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, features, feature_mask=None):
    if self.layout not in LAYOUTS:
      raise ValueError(f'layout={self.layout!r}; use one of {LAYOUTS}')
    if features.ndim not in (3, 4):
      raise ValueError(f'features of shape {features.shape}; want [batch, images, tokens, '
                       'width] or [batch, tokens, width]')
    one_image = features.ndim == 3
    if one_image:
      features = features[:, None]
      feature_mask = None if feature_mask is None else feature_mask[:, None]
    batch, images, tokens, width = features.shape
    features = features.astype(self.dtype)
    if self.max_images is not None:
      if images > self.max_images:
        raise ValueError(f'{images} images per example; max_images is {self.max_images}')
      time_embed = self.param(
          'time_embed', nn.with_logical_partitioning(nn.initializers.normal(1.0), (None, 'embed')),
          (self.max_images, width), jnp.float32)
      features = features + time_embed[:images, None, :].astype(self.dtype)
    latents_init = (nn.initializers.normal(1.0) if self.layout == 'flamingo'
                    else nn.initializers.ones_init())
    resampler_latents = self.param(
        'latents', nn.with_logical_partitioning(latents_init, ('length', 'embed')),
        (self.num_latents, width), jnp.float32)

    features = features.reshape(batch * images, tokens, width)
    latents = jnp.broadcast_to(resampler_latents.astype(self.dtype),
                               (batch * images, self.num_latents, width))
    kv_mask = None
    if feature_mask is not None:
      kv_mask = jnp.concatenate([feature_mask.reshape(batch * images, tokens).astype(bool),
                                 jnp.ones((batch * images, self.num_latents), bool)], axis=1)
    block = dict(
        layout=self.layout, num_heads=self.num_heads, head_dim=self.head_dim,
        num_kv_heads=self.num_kv_heads or self.num_heads, mlp_dim=self.mlp_ratio * width,
        activation=self.activation or _DEFAULT_ACTIVATION[self.layout],
        norm_eps=_DEFAULT_NORM_EPS[self.layout] if self.norm_eps is None else self.norm_eps,
        dtype=self.dtype)
    latents = ResamplerStack(self.depth, block, self.scan, name='transformer')(
        latents, features, kv_mask)
    latents = _norm(self.layout, block['norm_eps'], self.dtype, 'ln_final')(latents)
    latents = latents.reshape(batch, images, self.num_latents, width)
    return latents[:, 0] if one_image else latents
