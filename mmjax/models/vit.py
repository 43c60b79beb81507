"""Vision Transformer image tower (CLIP layout).

Patchify convolution without bias, a class token, learned positions, `ln_pre`, a
pre-LN Transformer, `ln_post` on the class token. Reused by every family that needs
image features.
"""

import flax.linen as nn
import jax.numpy as jnp

from mmjax.models import layers


class ViT(nn.Module):
  """`[batch, height, width, 3]` images -> (pooled `[batch, width]`, tokens `[batch, 1 + patches, width]`).

  `pooled` is `ln_post` of the class token; `tokens` are the last block's outputs
  (before `ln_post`), class token first.
  """
  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  activation: str = 'gelu'
  layer_norm_eps: float = 1e-5
  scan: bool = True
  remat: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images):
    batch, height, width, _ = images.shape
    if height % self.patch_size or width % self.patch_size:
      raise ValueError(
          f'image size {height}x{width} is not divisible by patch_size {self.patch_size}')
    x = nn.Conv(
        self.width, (self.patch_size,) * 2, strides=(self.patch_size,) * 2, padding='VALID',
        use_bias=False, dtype=self.dtype, name='patch_embed',
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), (None, None, None, 'embed')))(
                images.astype(self.dtype))
    x = x.reshape(batch, -1, self.width)
    scale = self.width ** -0.5
    class_token = self.param(
        'class_token',
        nn.with_logical_partitioning(nn.initializers.normal(scale), ('embed',)), (self.width,))
    x = jnp.concatenate([jnp.broadcast_to(class_token.astype(self.dtype), (batch, 1, self.width)),
                         x], axis=1)
    positions = self.param(
        'pos_embed',
        nn.with_logical_partitioning(nn.initializers.normal(scale), ('length', 'embed')),
        x.shape[1:])
    x = x + positions.astype(self.dtype)
    x = layers.layer_norm(self.layer_norm_eps, name='ln_pre')(x).astype(self.dtype)
    tokens = layers.Transformer(
        depth=self.depth, num_heads=self.num_heads, mlp_dim=int(self.width * self.mlp_ratio),
        activation=self.activation, layer_norm_eps=self.layer_norm_eps, scan=self.scan,
        remat=self.remat, dtype=self.dtype, name='transformer')(x)
    pooled = layers.layer_norm(self.layer_norm_eps, name='ln_post')(tokens[:, 0])
    return pooled, tokens
