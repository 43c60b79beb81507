"""The ViT's convolutional stem (`stem='conv'`): the patchify convolution's tokens, from
stride-2 3x3 convolutions (its config key: tests/test_config_validation.py)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from mmjax.models.vit import ViT


@pytest.mark.parametrize('patch_size', [2, 8])
def test_conv_stem_makes_the_patch_tokens(patch_size):
  images = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1, maxval=1)
  shapes = {}
  for stem in ('patch', 'conv'):
    vit = ViT(patch_size=patch_size, width=64, depth=1, num_heads=2, stem=stem)
    params = vit.init(jax.random.key(1), images)['params']
    pooled, tokens = vit.apply({'params': params}, images)
    shapes[stem] = (pooled.shape, tokens.shape)
    assert bool(jnp.all(jnp.isfinite(tokens)))
  assert shapes['conv'] == shapes['patch'] == ((2, 64), (2, 1 + (32 // patch_size) ** 2, 64))
  conv = ViT(patch_size=8, width=64, depth=1, num_heads=2, stem='conv')
  stem = nn.unbox(conv.init(jax.random.key(1), images)['params'])['stem']
  # log2(8) = 3 stride-2 convolutions with 16, 32 then 32 (width / 2) channels, then 1x1.
  assert [stem[f'conv_{i}']['kernel'].shape[-1] for i in range(3)] == [16, 16, 32]
  assert stem['project']['kernel'].shape == (1, 1, 32, 64)


def test_conv_stem_needs_a_power_of_two_patch():
  vit = ViT(patch_size=6, width=64, depth=1, num_heads=2, stem='conv')
  with pytest.raises(ValueError, match="stem='conv' needs a patch_size that is a power of 2"):
    vit.init(jax.random.key(0), jnp.zeros((1, 36, 36, 3)))
