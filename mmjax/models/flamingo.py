"""Flamingo: a frozen decoder LM reading visual tokens through tanh-gated cross-attention.

Alayrac et al., "Flamingo: a Visual Language Model for Few-Shot Learning", as OpenFlamingo
builds it (open_flamingo/src/helpers.py, flamingo_lm.py). Two models:

`Flamingo` is the whole family model: images `[batch, K, S, S, 3]` (one per `<image>` token)
go through the vision tower (our `ViT`, `pool='none'`, `ViT.patch_features`: the last
block's tokens, class token dropped), the Perceiver resampler (`mmjax.models.resampler`) and,
when the vision and LM widths differ, a linear `media_projection`, giving the media
`[batch, K, latents, lm_width]` that the text reads through `FlamingoLM`.
Params: `{'vision_tower', 'resampler', 'media_projection' (only when the widths differ), 'lm',
'gated_xattn'}`, initialised part by part by `Flamingo.init_params`.

`FlamingoLM` is the gated LM on media that are already resampled visual tokens `[batch,
images, latents, media_width]`. A `GatedCrossAttentionBlock` runs before every
`cross_attn_every`-th layer of the LM (layer i for (i + 1) % every == 0, OpenFlamingo's
placement): `x + tanh(attn_gate) * xattn(ln(x), media)`, then `x + tanh(ff_gate) * ff(x)`.
Both gates start at 0, so at init the model is the LM exactly. Text token j sees the latents
of image `text_time[j] = #<image> tokens at or before j` (only the latest image, default) or
of every image up to it (`only_attend_immediate_media=False`); tokens before the first
`<image>` see no media and get exactly zero from the cross-attention.
Params: `lm` (a `DecoderLM` tree, so a trained LM loads in unchanged) and `gated_xattn` (the
gated blocks, stacked on a leading `layers` axis of length depth / cross_attn_every).
`config.trainable = 'gated_xattn/.*'` (`mmjax.train.trainable_mask`) freezes the LM.

    model = Flamingo(vision=dict(patch_size=14, width=1024, depth=23, num_heads=16),
                     perceiver=dict(num_latents=64, depth=6),
                     language_model=dict(vocab_size=32000, width=4096, depth=32, ...),
                     media_token_id=32000, cross_attn_every=4)
    params = model.init_params(rng, images, tokens)
    logits = model.apply({'params': params}, images, tokens)         # [b, l, vocab] float32
    media = model.apply({'params': params}, images, method=model.media)
    generate.generate(model, {'params': params}, prompt_tokens=..., context=media, ...)

The layers run as one `nn.scan` over groups of `cross_attn_every` decoder layers with the
gated block before the group's last layer; the decoder's parameters enter the scan as data
(stacked `[groups, every, ...]`), which keeps them under `lm` while the gated blocks' own
parameters are scanned under `gated_xattn`.

Both models are `mmjax.generate` decoders (`init_cache`, `decode`, `embed`, `check_prompt`)
whose context is the media; `check_prompt` refuses a prompt row with more `<image>` tokens
than the media hold images (the text after the extra ones would silently see no image).
The cache is `{'lm': the LM's KV cache, 'images_seen': [batch] int32}`, the `<image>` tokens
of each row before the call's first token, so that a new token sees the image its row last
showed. The media keys and values are recomputed at each step (a few latents per image,
cheap next to the decoder's cache).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.models import layers
from mmjax.models import decoder
from mmjax.models.decoder import DecoderBlock, DecoderLM
from mmjax.models.resampler import PerceiverResampler
from mmjax.models.vit import ViT


def text_to_media_mask(tokens, media_token_id: int, num_images: int, latents: int,
                       only_attend_immediate_media: bool = True, images_before=None):
  """Which media keys each text token attends to: `[batch, length, num_images * latents]` bool.

  `tokens [batch, length]` int. Key k belongs to image `k // latents + 1`; token j has
  `text_time = images_before + cumsum(tokens == media_token_id)[j]` (the `<image>` token
  counts as after its image; `images_before [batch]` int, default 0: the `<image>` tokens
  before `tokens[:, 0]`, when decoding with a cache) and sees the keys of image `text_time`
  (or of images `<= text_time`).
  """
  text_time = jnp.cumsum(tokens == media_token_id, axis=1)
  if images_before is not None:
    text_time = text_time + images_before[:, None]
  media_time = jnp.repeat(jnp.arange(1, num_images + 1), latents)
  if only_attend_immediate_media:
    return text_time[:, :, None] == media_time
  return text_time[:, :, None] >= media_time


class MaskedCrossAttention(nn.Module):
  """Text `x [batch, length, width]` attends to `media [batch, keys, media_width]`.

  `media_mask [batch, length, keys]` bool (`text_to_media_mask`). Queries from `ln(x)`,
  keys and values from the media, no biases; returns `[batch, length, width]`, exactly 0
  for a token whose mask row is empty.
  """
  num_heads: int = 8
  head_dim: int = 64
  layer_norm_eps: float = 1e-5
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, media, media_mask):
    h = layers.layer_norm(self.layer_norm_eps, name='ln')(x).astype(self.dtype)
    attention = layers.Attention(self.num_heads, dtype=self.dtype, head_dim=self.head_dim,
                                 use_bias=False, name='attn')
    h = attention(h, media_mask[:, None], context=media.astype(self.dtype))
    # An empty row's softmax is uniform over all keys; OpenFlamingo zeroes it after softmax,
    # which (no biases) zeroes the output.
    sees_media = jnp.any(media_mask, axis=-1, keepdims=True)
    return jnp.where(sees_media, h, jnp.zeros_like(h))


class GatedCrossAttentionBlock(nn.Module):
  """`x + tanh(attn_gate) * xattn(x, media)`, then `x + tanh(ff_gate) * ff(x)`.

  `x [batch, length, width]` -> same shape; `ff` is ln -> Dense(mlp_ratio * width) -> GELU
  -> Dense(width) without biases; the scalar gates start at 0.
  """
  num_heads: int = 8
  head_dim: int = 64
  mlp_ratio: int = 4
  layer_norm_eps: float = 1e-5
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, media, media_mask):
    constrain = lambda y: nn.with_logical_constraint(y, ('act_batch', 'act_length', 'act_embed'))
    gate = lambda name: jnp.tanh(self.param(
        name, nn.with_logical_partitioning(nn.initializers.zeros_init(), ()), (),
        jnp.float32)).astype(self.dtype)
    width = x.shape[-1]
    x = constrain(x)
    h = MaskedCrossAttention(self.num_heads, self.head_dim, self.layer_norm_eps, self.dtype,
                             name='xattn')(x, media, media_mask)
    x = constrain(x + gate('attn_gate') * h)
    h = layers.layer_norm(self.layer_norm_eps, name='ln_ff')(x).astype(self.dtype)
    h = layers.Mlp(self.mlp_ratio * width, 'gelu', self.dtype, use_bias=False, name='ff')(h)
    return constrain(x + gate('ff_gate') * h)


class FlamingoLM(nn.Module):
  """Token ids `[batch, length]` and media `[batch, images, latents, media_width]` -> logits.

  Fields:
    language_model: `DecoderLM` kwargs (scanned or not); its `remat` applies to each group of
      decoder layers and their gated block.
    media_token_id: the `<image>` token id, one per image, where that image's text starts.
    cross_attn_every: a gated block before every this-many-th decoder layer; must divide
      the LM's depth.
    only_attend_immediate_media: text sees only its latest image (else all earlier ones).
    xattn_heads, xattn_head_dim, xattn_mlp_ratio: the gated blocks' sizes (OpenFlamingo:
      8, 64, 4).
  """
  language_model: dict
  media_token_id: int
  cross_attn_every: int = 1
  only_attend_immediate_media: bool = True
  xattn_heads: int = 8
  xattn_head_dim: int = 64
  xattn_mlp_ratio: int = 4
  dtype: layers.Dtype = jnp.float32

  def __post_init__(self):
    layers.freeze_dict_fields(self, 'language_model')
    super().__post_init__()

  def setup(self):
    depth = self.language_model['depth']
    if depth % self.cross_attn_every:
      raise ValueError(f'cross_attn_every={self.cross_attn_every} does not divide the '
                       f'language model depth {depth}')
    self.lm = DecoderLM(**self.language_model, dtype=self.dtype)
    self.gated_xattn = GatedCrossAttentionBlock(self.xattn_heads, self.xattn_head_dim,
                                                self.xattn_mlp_ratio, dtype=self.dtype)

  def decoder_layer_groups(self):
    """The LM's decoder layer params, stacked `[depth / cross_attn_every, every, ...]`."""
    decoder_params = nn.unbox(self.lm.variables['params']['decoder'])
    if 'blocks' in decoder_params:
      stacked = decoder_params['blocks']
    else:
      stacked = jax.tree.map(lambda *blocks: jnp.stack(blocks), *[
          decoder_params[f'block_{i}'] for i in range(self.lm.depth)])
    return jax.tree.map(lambda p: p.reshape(-1, self.cross_attn_every, *p.shape[1:]), stacked)

  def __call__(self, tokens, media, *, positions=None, kv_mask=None):
    """Logits `[batch, length, vocab]` float32; `positions`, `kv_mask` as in `DecoderLM`."""
    if self.is_initializing():
      self.lm(tokens, positions=positions, kv_mask=kv_mask)  # creates the `lm` params
    logits, _ = self._forward(tokens, media, positions, kv_mask)
    return logits

  def embed(self, tokens):
    """`[batch, length]` int -> the LM's token embeddings `[batch, length, width]`."""
    return self.lm.embed(tokens)

  @nn.nowrap
  def init_cache(self, batch: int, max_len: int, dtype=None) -> dict:
    """`{'lm': DecoderLM.init_cache(batch, max_len, dtype), 'images_seen': zeros [batch]
    int32}`, the empty cache of `decode`. Works on an unbound module."""
    lm = DecoderLM(**self.language_model, dtype=self.dtype, parent=None)
    return {'lm': lm.init_cache(batch, max_len, dtype),
            'images_seen': jnp.zeros(batch, jnp.int32)}

  def decode(self, tokens=None, *, embeddings=None, context=None, positions=None, kv_mask=None,
             cache=None, cache_index=None):
    """(logits `[batch, length, vocab]` float32, new cache or None): the
    `mmjax.generate.Decoder` step on token ids (not embeddings: the media mask counts the
    `<image>` tokens) and `context` = media `[batch, images, latents, media_width]`.

    Without a cache, `__call__`. With one (`init_cache` or an earlier call's; `cache_index`
    int32 scalar, the slot of `tokens[:, 0]`), each row's `images_seen` shifts its image count
    and grows by the call's `<image>` tokens. `positions` (default `cache_index +
    arange(length)`) and `kv_mask [batch, max_len]` as in `DecoderLM` with a cache.
    """
    if tokens is None or embeddings is not None:
      raise ValueError('a Flamingo reads token ids (its media mask counts <image> tokens), '
                       'not embeddings')
    if context is None:
      raise ValueError('a Flamingo reads media: pass context=media [batch, images, latents, '
                       'width]')
    if cache is None:
      return self._forward(tokens, context, positions, kv_mask)
    images_seen = cache['images_seen']
    logits, lm_cache = self._forward(tokens, context, positions, kv_mask, cache['lm'],
                                     cache_index, images_seen)
    images_seen = images_seen + jnp.sum(tokens == self.media_token_id, axis=1, dtype=jnp.int32)
    return logits, {'lm': lm_cache, 'images_seen': images_seen}

  @nn.nowrap
  def check_prompt(self, tokens, mask, context=None):
    """`mmjax.generate.Decoder.check_prompt` (host-side; works on an unbound module).

    Args:
      tokens: `[batch, prompt]` int (numpy).
      mask: `[batch, prompt]` bool, True on real tokens.
      context: the media `[batch, images, latents, media_width]`, or None (`decode` refuses
        that).

    Raises:
      ValueError: a real token outside the LM's vocabulary (`decoder.check_prompt_tokens`),
        or a row with more `<image>` tokens than the media hold images (the text after the
        extra ones would get exactly zero from the cross-attention), naming the row and the
        position of the first `<image>` without an image.
    """
    decoder.check_prompt_tokens(tokens, mask, self.language_model['vocab_size'])
    if context is None:
      return
    images = context.shape[1]
    is_image = (np.asarray(tokens) == self.media_token_id) & np.asarray(mask, bool)
    counts = is_image.sum(axis=1)
    if (counts > images).any():
      row = np.flatnonzero(counts > images)[0]
      position = np.flatnonzero(is_image[row])[images]
      raise ValueError(f'prompt row {row} has {counts[row]} <image> tokens (id '
                       f'{self.media_token_id}) but the media hold {images} images per row: '
                       f'the <image> at position {position} has no image')

  def _forward(self, tokens, media, positions, kv_mask, cache=None, cache_index=None,
               images_before=None):
    batch, images, latents, media_width = media.shape
    media = media.reshape(batch, images * latents, media_width)
    media_mask = text_to_media_mask(tokens, self.media_token_id, images, latents,
                                    self.only_attend_immediate_media, images_before)
    if positions is None:
      first_slot = 0 if cache is None else cache_index
      positions = jnp.broadcast_to(first_slot + jnp.arange(tokens.shape[1]), tokens.shape)
    lm, every = self.lm, self.cross_attn_every
    if lm.dropout_rate:
      raise ValueError(f'language_model.dropout_rate={lm.dropout_rate}: Flamingo runs the '
                       "decoder's layers without a dropout rng (its LM is frozen); use 0")
    decoder_block = DecoderBlock(**dict(lm.block_config(), dtype=self.dtype), parent=None)

    def layer_group(gated_block, x, group):
      """`every` decoder layers with the gated block before the last one; `group` holds
      their params and caches (None without a cache), stacked `[every, ...]`."""
      group_params, group_cache = group
      layer_caches = []
      for i in range(every):
        if i == every - 1:
          x = gated_block(x, media, media_mask)
        layer = lambda tree, i=i: jax.tree.map(lambda a: a[i], tree)
        x, layer_cache = decoder_block.apply({'params': layer(group_params)}, x, positions,
                                             kv_mask, layer(group_cache), cache_index)
        layer_caches.append(layer_cache)
      if group_cache is None:
        return x, None
      return x, jax.tree.map(lambda *caches: jnp.stack(caches), *layer_caches)

    stack = nn.scan(layers.remat_block(layer_group, lm.remat, scan=True),
                    variable_axes={'params': 0}, split_rngs={'params': True},
                    metadata_params={nn.PARTITION_NAME: 'layers'})
    # The cache `[depth, ...]` enters the scan as `[depth / every, every, ...]`, as the params.
    group_caches = None if cache is None else jax.tree.map(
        lambda c: c.reshape(-1, every, *c.shape[1:]), cache)
    x, group_caches = stack(self.gated_xattn, lm.embed(tokens),
                            (self.decoder_layer_groups(), group_caches))
    if cache is not None:
      cache = {name: nn.with_logical_constraint(c.reshape(-1, *c.shape[2:]), decoder.CACHE_AXES)
               for name, c in group_caches.items()}
    return lm.head(x), cache


class Flamingo(nn.Module):
  """Images `[batch, K, S, S, 3]` and token ids `[batch, length]` -> next-token logits.

  Fields:
    vision: `ViT` kwargs of the vision tower (its `pool` is forced to 'none').
    perceiver: `PerceiverResampler` kwargs of the `resampler` (its width is the vision width).
    language_model, media_token_id, cross_attn_every, only_attend_immediate_media,
      xattn_heads, xattn_head_dim, xattn_mlp_ratio: the `FlamingoLM`'s.
  Params: `vision_tower` (ViT), `resampler`, `media_projection` (a Dense `kernel [vision_width,
  lm_width]` and `bias`, only when the widths differ), and `FlamingoLM`'s `lm` and
  `gated_xattn` at the top level. `init_params` initialises them; `init` gives the same tree
  with other values.
  """
  vision: dict
  perceiver: dict
  language_model: dict
  media_token_id: int
  cross_attn_every: int = 1
  only_attend_immediate_media: bool = True
  xattn_heads: int = 8
  xattn_head_dim: int = 64
  xattn_mlp_ratio: int = 4
  dtype: layers.Dtype = jnp.float32

  def __post_init__(self):
    layers.freeze_dict_fields(self, 'vision', 'perceiver', 'language_model')
    super().__post_init__()

  @nn.nowrap
  def _text(self, **parent) -> FlamingoLM:
    """The gated LM; `parent=None` makes it standalone."""
    return FlamingoLM(self.language_model, self.media_token_id, self.cross_attn_every,
                      self.only_attend_immediate_media, self.xattn_heads, self.xattn_head_dim,
                      self.xattn_mlp_ratio, self.dtype, **parent)

  @nn.nowrap
  def _parts(self, **parent) -> dict:
    """The four parts as modules; `parent=None` makes them standalone (`init_params`)."""
    lm_width = self.language_model['width']
    projection = None
    if self.vision['width'] != lm_width:
      projection = layers.Dense(lm_width, ('embed', None), dtype=self.dtype, **parent)
    return dict(vision_tower=ViT(**dict(self.vision, pool='none'), dtype=self.dtype, **parent),
                resampler=PerceiverResampler(**self.perceiver, dtype=self.dtype, **parent),
                media_projection=projection, text=self._text(**parent))

  def setup(self):
    parts = self._parts()
    self.vision_tower = parts['vision_tower']
    self.resampler = parts['resampler']
    self.media_projection = parts['media_projection']
    self.text = parts['text']
    nn.share_scope(self, self.text)  # `lm` and `gated_xattn` sit at the top of the tree

  @nn.nowrap
  def init_params(self, rng, images, tokens) -> dict:
    """Boxed params for images `[b, K, S, S, 3]` and tokens `[b, L]` (arrays or
    `jax.ShapeDtypeStruct`s: only the image size matters). `rng` splits in 4 (vision tower,
    resampler, media projection, gated LM) and each part is initialised on its own, on zeros
    of batch 1 and one image. Works on an unbound module."""
    parts = self._parts(parent=None)
    vision_rng, resampler_rng, projection_rng, text_rng = jax.random.split(rng, 4)
    image = jnp.zeros((1,) + tuple(images.shape[2:]), jnp.float32)
    vision = parts['vision_tower']
    params = {'vision_tower': vision.init(vision_rng, image)['params']}
    features = jax.eval_shape(functools.partial(vision.apply, method=vision.patch_features),
                              {'params': params['vision_tower']}, image)
    params['resampler'] = parts['resampler'].init(
        resampler_rng, jnp.zeros((1, 1) + features.shape[1:], jnp.float32))['params']
    latents = (1, 1, parts['resampler'].num_latents, self.vision['width'])
    if parts['media_projection'] is not None:
      params['media_projection'] = parts['media_projection'].init(
          projection_rng, jnp.zeros(latents, jnp.float32))['params']
    media = jnp.zeros(latents[:-1] + (self.language_model['width'],), jnp.float32)
    params.update(parts['text'].init(text_rng, jnp.zeros((1, tokens.shape[1]), jnp.int32),
                                     media)['params'])
    return params

  def vision_features(self, images):
    """`[n, S, S, 3]` -> `[n, patches, vision_width]` (`ViT.patch_features`)."""
    return self.vision_tower.patch_features(images)

  def media(self, images):
    """Images `[b, K, S, S, 3]` -> media `[b, K, num_latents, lm_width]`."""
    batch, images_per_row = images.shape[:2]
    features = self.vision_features(images.reshape((-1,) + images.shape[2:]))
    features = features.reshape((batch, images_per_row) + features.shape[1:])
    media = self.resampler(features)
    if self.media_projection is not None:
      media = self.media_projection(media)
    return media

  def image_embedding(self, images):
    """`[n, S, S, 3]` -> unit vectors `[n, vision_width]`: the vision features averaged over
    patches (few-shot demonstration retrieval)."""
    pooled = jnp.mean(self.vision_features(images), axis=1)
    return pooled / jnp.linalg.norm(pooled, axis=-1, keepdims=True)

  def __call__(self, images, tokens, *, positions=None, kv_mask=None):
    """Logits `[batch, length, vocab]` float32; `positions`, `kv_mask` as in `DecoderLM`."""
    return self.text(tokens, self.media(images), positions=positions, kv_mask=kv_mask)

  def embed(self, tokens):
    """`[batch, length]` int -> the LM's token embeddings `[batch, length, lm_width]`."""
    return self.text.embed(tokens)

  @nn.nowrap
  def init_cache(self, batch: int, max_len: int, dtype=None) -> dict:
    """`FlamingoLM.init_cache`. Works on an unbound module."""
    return self._text(parent=None).init_cache(batch, max_len, dtype)

  def decode(self, tokens=None, *, embeddings=None, context=None, positions=None, kv_mask=None,
             cache=None, cache_index=None):
    """`FlamingoLM.decode`; `context` is `media(images)`."""
    return self.text.decode(tokens, embeddings=embeddings, context=context, positions=positions,
                            kv_mask=kv_mask, cache=cache, cache_index=cache_index)

  @nn.nowrap
  def check_prompt(self, tokens, mask, context=None):
    """`FlamingoLM.check_prompt`; `context` is `media(images)`. Works on an unbound module."""
    self._text(parent=None).check_prompt(tokens, mask, context)
