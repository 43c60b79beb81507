"""CLIP / SigLIP dual encoder: ViT image tower, causal text tower, learned temperature.

The two towers map images and captions into one `embed_dim` space of unit vectors;
`losses.softmax_contrastive_loss` (CLIP) or `losses.sigmoid_contrastive_loss` (SigLIP)
pulls matching pairs together. The layout follows OpenAI CLIP (and so Hugging Face
`CLIPModel`): pre-LN blocks, text pooled at the end-of-text token, found as
`argmax(token_ids)` because it has the highest id, projections without bias.
"""

import flax.linen as nn
import jax.numpy as jnp

from mmjax.models import layers
from mmjax.models.vit import ViT


def l2_normalize(x, eps=1e-12):
  x = x.astype(jnp.float32)
  return x / jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


def projection(embed_dim, dtype, name):
  return layers.Dense(embed_dim, ('embed', None), use_bias=False, dtype=dtype, name=name,
                      kernel_init=nn.initializers.lecun_normal)


class TextTower(nn.Module):
  """`[batch, length]` token ids -> (pooled `[batch, width]`, tokens `[batch, length, width]`)."""
  vocab_size: int
  context_length: int
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
  def __call__(self, token_ids):
    length = token_ids.shape[1]
    if length > self.context_length:
      raise ValueError(f'text length {length} exceeds context_length {self.context_length}')
    token_embed = self.param(
        'token_embed',
        nn.with_logical_partitioning(nn.initializers.normal(0.02), ('vocab', 'embed')),
        (self.vocab_size, self.width))
    positions = self.param(
        'pos_embed',
        nn.with_logical_partitioning(nn.initializers.normal(0.01), ('length', 'embed')),
        (self.context_length, self.width))
    # Gather the (possibly sharded) table before the lookup, as FSDP does for every weight.
    token_embed = nn.with_logical_constraint(token_embed, (None, None))
    x = (jnp.take(token_embed, token_ids, axis=0) + positions[:length]).astype(self.dtype)
    x = nn.with_logical_constraint(x, ('act_batch', 'act_length', 'act_embed'))
    tokens = layers.Transformer(
        depth=self.depth, num_heads=self.num_heads, mlp_dim=int(self.width * self.mlp_ratio),
        causal=True, activation=self.activation, layer_norm_eps=self.layer_norm_eps,
        scan=self.scan, remat=self.remat, dtype=self.dtype, name='transformer')(x)
    tokens = layers.layer_norm(self.layer_norm_eps, name='ln_final')(tokens)
    end_of_text = jnp.argmax(token_ids, axis=-1)
    pooled = jnp.take_along_axis(tokens, end_of_text[:, None, None], axis=1)[:, 0]
    return pooled, tokens


class CLIP(nn.Module):
  """Two towers, their projections, the temperature and (SigLIP) the logit bias.

  `__call__(images [b, h, w, 3], token_ids [b, l])` returns
  `(image_embeddings [b, embed_dim], text_embeddings [b, embed_dim], logit_scale, logit_bias)`
  with unit-norm float32 embeddings; `logit_scale` is `exp(temperature)` clipped at
  `max_logit_scale`; `logit_bias` is None unless `bias_init` is set.
  """
  image: dict
  text: dict
  embed_dim: int
  temperature_init: float = 2.6592600  # log(1 / 0.07)
  max_logit_scale: float = 100.0
  bias_init: float | None = None
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    self.image_tower = ViT(**self.image, dtype=self.dtype)
    self.text_tower = TextTower(**self.text, dtype=self.dtype)
    self.image_projection = projection(self.embed_dim, self.dtype, 'image_projection')
    self.text_projection = projection(self.embed_dim, self.dtype, 'text_projection')
    self.temperature = self.param(
        'temperature', nn.initializers.constant(self.temperature_init), ())
    if self.bias_init is not None:
      self.logit_bias = self.param('logit_bias', nn.initializers.constant(self.bias_init), ())

  def encode_image(self, images):
    """`[b, h, w, 3]` in [-1, 1] -> unit vectors `[b, embed_dim]`."""
    pooled, _ = self.image_tower(images)
    return l2_normalize(self.image_projection(pooled))

  def encode_text(self, token_ids):
    """`[b, l]` int token ids -> unit vectors `[b, embed_dim]`."""
    pooled, _ = self.text_tower(token_ids)
    return l2_normalize(self.text_projection(pooled))

  def __call__(self, images, token_ids):
    logit_scale = jnp.minimum(jnp.exp(self.temperature), self.max_logit_scale)
    logit_bias = self.logit_bias if self.bias_init is not None else None
    return self.encode_image(images), self.encode_text(token_ids), logit_scale, logit_bias
