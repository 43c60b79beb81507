"""Flamingo: a frozen decoder LM reading visual tokens through tanh-gated cross-attention.

Alayrac et al., "Flamingo: a Visual Language Model for Few-Shot Learning", as OpenFlamingo
builds it (open_flamingo/src/helpers.py, flamingo_lm.py). A `GatedCrossAttentionBlock`
runs before every `cross_attn_every`-th layer of the LM (layer i for (i + 1) % every == 0,
OpenFlamingo's placement): `x + tanh(attn_gate) * xattn(ln(x), media)`, then
`x + tanh(ff_gate) * ff(x)`. Both gates start at 0, so at init the model is the LM exactly.

Media are already resampled visual tokens `[batch, images, latents, media_width]` (the
Perceiver resampler's output). Text token j sees the latents of image
`text_time[j] = #<image> tokens at or before j` (only the latest image, default) or of
every image up to it (`only_attend_immediate_media=False`); tokens before the first
`<image>` see no media and get exactly zero from the cross-attention.

Params: `lm` (a `DecoderLM` tree, so a trained LM loads in unchanged) and `gated_xattn`
(the gated blocks, stacked on a leading `layers` axis of length depth / cross_attn_every).
`config.trainable = 'gated_xattn/.*'` (`mmjax.train.trainable_mask`) freezes the LM.

    model = Flamingo(language_model=dict(vocab_size=32000, width=4096, depth=32, ...),
                     media_token_id=32000, cross_attn_every=4)
    logits = model.apply({'params': params}, tokens, media)        # [b, l, vocab] float32

The layers run as one `nn.scan` over groups of `cross_attn_every` decoder layers with the
gated block before the group's last layer; the decoder's parameters enter the scan as
data (stacked `[groups, every, ...]`), which keeps them under `lm` while the gated
blocks' own parameters are scanned under `gated_xattn`.

Generation with a KV cache (`mmjax.generate.generate(model, ..., media=...)`): `decode` takes
the LM's cache (`init_cache`, `DecoderLM`'s, threaded through the groups) and `images_before
[batch]`, the `<image>` tokens before this call's first token, so that a new token sees the
image its row last showed. The media keys and values are
recomputed at each step (a few latents per image, cheap next to the decoder's cache).
"""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models import layers
from mmjax.models import decoder
from mmjax.models.decoder import DecoderBlock, DecoderLM


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


class Flamingo(nn.Module):
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
    # Hashable, so that the module can be a static argument of jit (as in mmjax.generate).
    object.__setattr__(self, 'language_model', flax.core.FrozenDict(self.language_model))
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

  def decode(self, tokens, media, *, cache, cache_index, images_before, positions=None,
             kv_mask=None):
    """(logits `[batch, length, vocab]` float32, updated cache): `__call__` with a KV cache.

    `cache`: `init_cache(model, batch, max_len)` or an earlier call's; `cache_index` int32
    scalar, the slot of `tokens[:, 0]`; `images_before [batch]` int, the `<image>` tokens of
    each row in the slots before it. `positions` (default `cache_index + arange(length)`)
    and `kv_mask [batch, max_len]` as in `DecoderLM` with a cache.
    """
    return self._forward(tokens, media, positions, kv_mask, cache, cache_index, images_before)

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
    decoder_block = DecoderBlock(
        lm.num_heads, lm.num_kv_heads, lm.mlp_dim, lm.head_dim, lm.rope_theta, lm.norm_eps,
        lm.attention_bias, self.dtype, parent=None)

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
    x = lm.ln_final(x)
    if lm.tie_embeddings:
      logits = jnp.einsum('ble,ve->blv', x, lm.token_embed.astype(self.dtype))
    else:
      logits = lm.lm_head(x)
    logits = nn.with_logical_constraint(logits.astype(jnp.float32),
                                        ('act_batch', 'act_length', None))
    return logits, cache


def init_cache(model: Flamingo, batch: int, max_len: int, dtype=None) -> dict:
  """The empty KV cache of `model`'s LM for `Flamingo.decode` (`decoder.init_cache`)."""
  lm = DecoderLM(**model.language_model, dtype=model.dtype)
  return decoder.init_cache(lm, batch, max_len, dtype)
