"""Vision Transformer image tower, in the CLIP layout by default or the SigLIP layout.

CLIP (the defaults): patchify convolution without bias, a class token, learned
positions, `ln_pre`, a pre-LN Transformer, `ln_post` on the class token.
SigLIP (`patch_bias=True, class_token=False, ln_pre=False, pool='map'`): patchify
convolution with bias, learned positions, the Transformer, `ln_post` on every token, then
a multi-head attention pooling head. `stem='conv'` replaces the patchify convolution by a
convolutional stem (Xiao et al. 2021, "Early convolutions help transformers see better").
Reused by every family that needs image features.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models import layers


class MAPHead(nn.Module):
  """Multi-head attention pooling: `[batch, length, width]` tokens -> `[batch, width]`.

  A learned probe attends over the tokens (`attn`, keys and values from the tokens),
  then `y + mlp(ln(y))` on the attended vector `y` (big_vision's `MAPHead`, HF's
  `SiglipMultiheadAttentionPoolingHead`).
  """
  num_heads: int
  mlp_dim: int
  activation: str = 'gelu'
  layer_norm_eps: float = 1e-5
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens):
    batch, _, width = tokens.shape
    probe = self.param(
        'probe',
        nn.with_logical_partitioning(nn.initializers.normal(width ** -0.5), ('embed',)),
        (width,))
    probe = jnp.broadcast_to(probe.astype(self.dtype), (batch, 1, width))
    y = layers.Attention(self.num_heads, dtype=self.dtype, name='attn')(
        probe, context=tokens.astype(self.dtype))
    h = layers.layer_norm(self.layer_norm_eps, name='ln')(y).astype(self.dtype)
    y = y + layers.Mlp(self.mlp_dim, self.activation, self.dtype, name='mlp')(h)
    return y[:, 0]


class ConvStem(nn.Module):
  """`[batch, H, W, 3]` -> `[batch, H / patch, W / patch, width]` by log2(patch) 3x3
  convolutions of stride 2, each followed by a LayerNorm over channels and a GELU, then a
  1x1 convolution to `width` (the params `conv_{i}`, `norm_{i}`, `project`).

  Channels double at each stride-2 convolution and reach `width / 2` at the last one (at
  least 16), as Xiao et al.'s stem, with LayerNorm in place of BatchNorm so that training
  keeps no running statistics. The same tokens as a patchify convolution of `patch`, with a
  receptive field that grows gradually.
  """
  patch_size: int
  width: int
  layer_norm_eps: float = 1e-5
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images):
    steps = int(round(math.log2(self.patch_size)))
    if 2 ** steps != self.patch_size or steps < 1:
      raise ValueError(f"stem='conv' needs a patch_size that is a power of 2 >= 2, got "
                       f'{self.patch_size}')
    x = images.astype(self.dtype)
    conv_init = nn.with_logical_partitioning(nn.initializers.he_normal(),
                                             (None, None, None, 'embed'))
    for i in range(steps):
      channels = max(16, self.width // 2 ** (steps - i))
      x = nn.Conv(channels, (3, 3), strides=(2, 2), padding='SAME', use_bias=False,
                  dtype=self.dtype, kernel_init=conv_init, name=f'conv_{i}')(x)
      x = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=jnp.float32,
                       name=f'norm_{i}')(x).astype(self.dtype)
      x = nn.gelu(x)
    return nn.Conv(self.width, (1, 1), dtype=self.dtype, name='project', kernel_init=(
        nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                     (None, None, None, 'embed'))))(x)


class ViT(nn.Module):
  """`[batch, height, width, 3]` images -> (pooled `[batch, width]`, tokens `[batch, n, width]`).

  `tokens` are the last block's outputs (before `ln_post`), `n = patches + class_token`,
  class token first. `pooled` depends on `pool`:
    'cls': `ln_post` of the class token (needs `class_token=True`), as CLIP;
    'map': `MAPHead` (param `map_head`) over `ln_post` of every token, as SigLIP;
    'none': None, and no `ln_post` or head params (a feature extractor, as LLaVA's).
  Architecture options (defaults give the CLIP layout and its param tree):
    patch_bias   the patchify convolution has a bias (`patch_embed/bias`).
    class_token  prepend a learned class token (`class_token`, `[width]`).
    ln_pre       layer norm (`ln_pre`) on the embedded tokens before the Transformer.
    stem         'patch': the patchify convolution (`patch_embed`); 'conv': a `ConvStem`
                 (`stem`) making the same number of tokens.
  """
  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  activation: str = 'gelu'
  layer_norm_eps: float = 1e-5
  patch_bias: bool = False
  class_token: bool = True
  ln_pre: bool = True
  pool: str = 'cls'
  stem: str = 'patch'
  scan: bool = True
  scan_unroll: int | bool = 1  # `layers.Transformer.scan_unroll`
  remat: bool | str = False  # a `layers.REMAT_POLICIES` name, or True (full) / False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images):
    if self.pool not in ('cls', 'map', 'none'):
      raise ValueError(f"pool must be 'cls', 'map' or 'none', got {self.pool!r}")
    if self.pool == 'cls' and not self.class_token:
      raise ValueError("pool='cls' needs class_token=True")
    batch, height, width, _ = images.shape
    if height % self.patch_size or width % self.patch_size:
      raise ValueError(
          f'image size {height}x{width} is not divisible by patch_size {self.patch_size}')
    if self.stem == 'conv':
      x = ConvStem(self.patch_size, self.width, self.layer_norm_eps, self.dtype,
                   name='stem')(images)
    elif self.stem == 'patch':
      x = nn.Conv(
          self.width, (self.patch_size,) * 2, strides=(self.patch_size,) * 2, padding='VALID',
          use_bias=self.patch_bias, dtype=self.dtype, name='patch_embed',
          kernel_init=nn.with_logical_partitioning(
              nn.initializers.lecun_normal(), (None, None, None, 'embed')),
          bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ('embed',)))(
              images.astype(self.dtype))
    else:
      raise ValueError(f"stem must be 'patch' or 'conv', got {self.stem!r}")
    x = x.reshape(batch, -1, self.width)
    scale = self.width ** -0.5
    if self.class_token:
      class_token = self.param(
          'class_token',
          nn.with_logical_partitioning(nn.initializers.normal(scale), ('embed',)),
          (self.width,))
      x = jnp.concatenate(
          [jnp.broadcast_to(class_token.astype(self.dtype), (batch, 1, self.width)), x], axis=1)
    positions = self.param(
        'pos_embed',
        nn.with_logical_partitioning(nn.initializers.normal(scale), ('length', 'embed')),
        x.shape[1:])
    x = x + positions.astype(self.dtype)
    if self.ln_pre:
      x = layers.layer_norm(self.layer_norm_eps, name='ln_pre')(x).astype(self.dtype)
    mlp_dim = int(self.width * self.mlp_ratio)
    tokens = layers.Transformer(
        depth=self.depth, num_heads=self.num_heads, mlp_dim=mlp_dim,
        activation=self.activation, layer_norm_eps=self.layer_norm_eps, scan=self.scan,
        scan_unroll=self.scan_unroll, remat=self.remat, dtype=self.dtype,
        name='transformer')(x)
    if self.pool == 'none':
      return None, tokens
    ln_post = layers.layer_norm(self.layer_norm_eps, name='ln_post')
    if self.pool == 'cls':
      pooled = ln_post(tokens[:, 0])
    else:
      pooled = MAPHead(self.num_heads, mlp_dim, self.activation, self.layer_norm_eps,
                       self.dtype, name='map_head')(ln_post(tokens))
    return pooled, tokens

  def patch_features(self, images):
    """`[batch, height, width, 3]` -> `[batch, patches, width]`: the last block's tokens (no
    `ln_post`), class token dropped. The image features of LLaVA and Flamingo (with
    `pool='none'`, which creates no `ln_post` or head params)."""
    _, tokens = self(images)
    return tokens[:, 1:] if self.class_token else tokens


def vision_params_from_clip(clip_image_params, *, depth: int, scan: bool = True) -> dict:
  """One of our CLIP checkpoints' `image_tower` params -> the params of a `ViT` of `depth`
  blocks with `pool='none'` (LLaVA's and Flamingo's vision tower: CLIP's penultimate layer).

  Keeps the embeddings (patches, positions, class token), `ln_pre` and the first `depth`
  blocks, drops the later blocks, `ln_post` and any pooling head. The CLIP blocks may be
  stacked (`transformer/blocks`, scan) or `block_{i}`; they come out stacked if `scan`.
  Boxed params come out unboxed.
  """
  params = nn.unbox(clip_image_params)
  transformer = params['transformer']
  available = (jax.tree.leaves(transformer['blocks'])[0].shape[0] if 'blocks' in transformer
               else len(transformer))
  if available < depth:
    raise ValueError(f'the CLIP image tower has {available} blocks; the vision tower '
                     f'needs {depth}')

  def select_blocks(transformer):
    if 'blocks' in transformer:
      stacked = jax.tree.map(lambda x: x[:depth], transformer['blocks'])
    else:
      stacked = jax.tree.map(lambda *blocks: jnp.stack(blocks),
                             *[transformer[f'block_{i}'] for i in range(depth)])
    if scan:
      return {'blocks': stacked}
    return {f'block_{i}': jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(depth)}

  kept = {name: value for name, value in params.items()
          if name not in ('transformer', 'ln_post', 'map_head')}
  kept['transformer'] = jax.jit(select_blocks)(transformer)  # one compile, not one per op
  return kept
