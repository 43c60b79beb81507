"""CLIP / SigLIP dual encoder: ViT or ResNet image tower, text tower, learned temperature.

The two towers map images and captions into one `embed_dim` space of unit vectors;
`losses.softmax_contrastive_loss` (CLIP) or `losses.sigmoid_contrastive_loss` (SigLIP)
pulls matching pairs together. The default layout follows OpenAI CLIP (and so Hugging
Face `CLIPModel`): pre-LN blocks, a causal text tower pooled at the end-of-text token,
found as `argmax(token_ids)` because it has the highest id, projections without bias.
Options give the SigLIP layout of Hugging Face `SiglipModel` (see `mmjax.convert`):
image tower `ViT(patch_bias=True, class_token=False, ln_pre=False, pool='map')`, text
tower `TextTower(causal=False, pool='last')`, `image_projection_kind='none'`,
`text_projection_kind='linear_bias'`. The image tower may instead be CLIP's ResNet
(`image['kind']='resnet'`, `mmjax.models.resnet.ModifiedResNet`), whose attention pool
projects to `embed_dim` itself (open_clip's RN50 layout: `image_projection_kind='none'`).
"""

import flax.linen as nn
import jax.numpy as jnp

from mmjax.models import layers
from mmjax.models.resnet import ModifiedResNet
from mmjax.models.vit import ViT


def l2_normalize(x, eps=1e-12):
  x = x.astype(jnp.float32)
  return x / jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


PROJECTION_KINDS = ('linear', 'linear_bias', 'none')
IMAGE_TOWERS = {'vit': ViT, 'resnet': ModifiedResNet}  # `CLIP.image['kind']` -> module


def pooled_width(kind: str, tower: dict) -> int:
  """The width of the pooled output of an image tower of `kind` with kwargs `tower`:
  `output_dim` for a `ModifiedResNet`, `width` for a `ViT`."""
  return tower['output_dim'] if kind == 'resnet' else tower['width']


def projection(kind, embed_dim, dtype):
  """`[batch, width]` -> `[batch, embed_dim]`: a Dense layer, or None for `kind='none'`."""
  if kind not in PROJECTION_KINDS:
    raise ValueError(f'projection kind must be one of {PROJECTION_KINDS}, got {kind!r}')
  if kind == 'none':
    return None
  return layers.Dense(embed_dim, ('embed', None), use_bias=kind == 'linear_bias', dtype=dtype,
                      kernel_init=nn.initializers.lecun_normal)


POOLS = ('eot', 'last', 'mean')  # `TextTower.pool`


class TextTower(nn.Module):
  """`[batch, length]` token ids -> (pooled `[batch, width]`, tokens `[batch, length, width]`).

  `tokens` are `ln_final` of the last block's outputs; `pooled` is chosen by `pool`: 'eot'
  the end-of-text token, found as `argmax(token_ids)` (CLIP), 'last' the last position,
  padding or not (SigLIP, trained on texts padded to a fixed length), or 'mean' the mean of
  the tokens from the first up to the end-of-text token (padding left out): every word of
  the caption pooled, closer to a bag of words than the end token alone.
  `causal=True` (CLIP) lets a token see only earlier ones; `causal=False` (SigLIP) lets
  every token, padding included, see every token.
  """
  vocab_size: int
  context_length: int
  width: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  activation: str = 'gelu'
  layer_norm_eps: float = 1e-5
  causal: bool = True
  pool: str = 'eot'
  scan: bool = True
  scan_unroll: int | bool = 1  # `layers.Transformer.scan_unroll`
  remat: bool | str = False  # a `layers.REMAT_POLICIES` name, or True (full) / False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, token_ids):
    if self.pool not in POOLS:
      raise ValueError(f'pool must be one of {POOLS}, got {self.pool!r}')
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
        causal=self.causal, activation=self.activation, layer_norm_eps=self.layer_norm_eps,
        scan=self.scan, scan_unroll=self.scan_unroll, remat=self.remat, dtype=self.dtype,
        name='transformer')(x)
    tokens = layers.layer_norm(self.layer_norm_eps, name='ln_final')(tokens)
    end_of_text = jnp.argmax(token_ids, axis=-1)  # [batch]
    if self.pool == 'last':
      pooled = tokens[:, -1]
    elif self.pool == 'mean':
      text = (jnp.arange(length)[None, :] <= end_of_text[:, None]).astype(jnp.float32)
      pooled = (jnp.einsum('bl,bld->bd', text, tokens.astype(jnp.float32))
                / jnp.sum(text, axis=1, keepdims=True)).astype(tokens.dtype)
    else:
      pooled = jnp.take_along_axis(tokens, end_of_text[:, None, None], axis=1)[:, 0]
    return pooled, tokens


class CLIP(nn.Module):
  """Two towers, their projections, the temperature and (SigLIP) the logit bias.

  `image`: the image tower's kwargs and its `kind` (default 'vit'): 'vit' a `ViT`, 'resnet'
  a `ModifiedResNet`; either is the param `image_tower`. `text`: `TextTower` kwargs.

  `__call__(images [b, h, w, 3], token_ids [b, l], train=False)` returns
  `(image_embeddings [b, embed_dim], text_embeddings [b, embed_dim], logit_scale, logit_bias)`
  with unit-norm float32 embeddings; `logit_scale` is `exp(temperature)` clipped at
  `max_logit_scale` (None: not clipped); `logit_bias` is None unless `bias_init` is set.
  The logits are `logit_scale * image_embeddings @ text_embeddings.T (+ logit_bias)`.
  `train=True` (the training loss) makes a ResNet tower with BatchNorm normalise with the
  batch's moments and put them in the `batch_stats` collection when it is mutable
  (`mmjax.models.resnet`); it changes nothing else.

  `image_projection_kind` / `text_projection_kind` map a tower's pooled `[b, width]` to
  `[b, embed_dim]`: 'linear' (CLIP; kernel only), 'linear_bias' (SigLIP's text `head`),
  or 'none' (SigLIP's image tower; no param, needs the tower's width == embed_dim).
  """
  image: dict
  text: dict
  embed_dim: int
  temperature_init: float = 2.6592600  # log(1 / 0.07)
  max_logit_scale: float | None = 100.0
  bias_init: float | None = None
  image_projection_kind: str = 'linear'
  text_projection_kind: str = 'linear'
  dtype: jnp.dtype = jnp.float32

  @property
  def image_kind(self) -> str:
    return self.image.get('kind', 'vit')

  def setup(self):
    if self.image_kind not in IMAGE_TOWERS:
      raise ValueError(f"image kind must be one of {tuple(IMAGE_TOWERS)}, got "
                       f"{self.image_kind!r}")
    image = {key: value for key, value in self.image.items() if key != 'kind'}
    for tower, kind, width in (
        ('image', self.image_projection_kind, pooled_width(self.image_kind, image)),
        ('text', self.text_projection_kind, self.text['width'])):
      if kind == 'none' and width != self.embed_dim:
        raise ValueError(f"{tower}_projection_kind='none' needs {tower} width "
                         f"{width} == embed_dim {self.embed_dim}")
    self.image_tower = IMAGE_TOWERS[self.image_kind](**image, dtype=self.dtype)
    self.text_tower = TextTower(**self.text, dtype=self.dtype)
    self.image_projection = projection(self.image_projection_kind, self.embed_dim, self.dtype)
    self.text_projection = projection(self.text_projection_kind, self.embed_dim, self.dtype)
    self.temperature = self.param(
        'temperature', nn.initializers.constant(self.temperature_init), ())
    if self.bias_init is not None:
      self.logit_bias = self.param('logit_bias', nn.initializers.constant(self.bias_init), ())

  def encode_image(self, images, train: bool = False):
    """`[b, h, w, 3]` in [-1, 1] -> unit vectors `[b, embed_dim]` (`train`: see the class)."""
    pooled, _ = (self.image_tower(images, train=train) if self.image_kind == 'resnet'
                 else self.image_tower(images))
    return l2_normalize(pooled if self.image_projection is None
                        else self.image_projection(pooled))

  def encode_text(self, token_ids):
    """`[b, l]` int token ids -> unit vectors `[b, embed_dim]`."""
    pooled, _ = self.text_tower(token_ids)
    return l2_normalize(pooled if self.text_projection is None
                        else self.text_projection(pooled))

  def __call__(self, images, token_ids, train: bool = False):
    logit_scale = jnp.exp(self.temperature)
    if self.max_logit_scale is not None:
      logit_scale = jnp.minimum(logit_scale, self.max_logit_scale)
    logit_bias = self.logit_bias if self.bias_init is not None else None
    return (self.encode_image(images, train), self.encode_text(token_ids), logit_scale,
            logit_bias)
