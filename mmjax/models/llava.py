"""LLaVA: CLIP image features -> projector -> decoder LM, image features spliced into the text.

Liu et al., "Visual Instruction Tuning" (LLaVA-1: a linear projector) and "Improved
Baselines with Visual Instruction Tuning" (LLaVA-1.5: `mlp2x_gelu`, Dense-GELU-Dense).
The image features are the tokens of the vision tower's penultimate layer with the class
token dropped (Hugging Face `vision_feature_layer=-2`,
`vision_feature_select_strategy='default'`). So the vision tower here is a ViT of
`depth = CLIP depth - 1` blocks with `pool='none'` (no `ln_post`): the last CLIP layer,
which LLaVA never reads, is neither stored nor run. `vision_params_from_clip` cuts such a
tower out of one of our CLIP checkpoints.

The two-stage recipe is a `config.trainable` regex (`mmjax.train.trainable_mask`): stage 1
trains the projector alone ('projector/.*'), stage 2 the projector and the LM
('(projector|lm)/.*'); the vision tower stays frozen in both.

    model = LLaVA(vision=dict(patch_size=14, width=1024, depth=23, num_heads=16),
                  language_model=dict(vocab_size=32064, width=4096, depth=32, ...),
                  image_token_id=32000)
    logits = model.apply({'params': params}, images, tokens)       # [b, l, vocab]
    features = model.apply({'params': params}, images, method=model.image_features)
    generate.generate(model, {'params': params}, prompt_tokens=tokens, context=features, ...)

LLaVA is an `mmjax.generate` decoder (`init_cache`, `decode`, `embed`, `check_prompt`) whose
context is the projected image features: `decode` splices them in at the image tokens of its
call's tokens, the cache `{'lm': the LM's KV cache, 'image_tokens_seen': [batch] int32}`
counting the image tokens already spliced.
"""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mmjax.models import layers
from mmjax.models.decoder import DecoderLM, check_prompt_tokens
from mmjax.models.vit import ViT, vision_params_from_clip

PROJECTOR_KINDS = ('linear', 'mlp')


class Projector(nn.Module):
  """Vision features `[batch, patches, vision_width]` -> LM inputs `[batch, patches, width]`.

  'linear' (LLaVA-1): one Dense `fc1`. 'mlp' (LLaVA-1.5 `mlp2x_gelu`): `fc2(gelu(fc1(x)))`
  with `width` hidden units and exact (erf) GELU.
  """
  kind: str
  width: int
  use_bias: bool = True
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.kind == 'linear':
      return layers.Dense(self.width, ('embed', None), use_bias=self.use_bias, dtype=self.dtype,
                          name='fc1')(x)
    h = layers.Dense(self.width, ('embed', 'mlp'), use_bias=self.use_bias, dtype=self.dtype,
                     name='fc1')(x)
    h = nn.with_logical_constraint(layers.gelu(h), ('act_batch', 'act_length', 'act_mlp'))
    return layers.Dense(self.width, ('mlp', 'embed'), use_bias=self.use_bias, dtype=self.dtype,
                        name='fc2')(h)


class LLaVA(nn.Module):
  """Images `[batch, size, size, 3]` and token ids `[batch, length]` -> next-token logits.

  Fields:
    vision: `ViT` kwargs of the vision tower (its `pool` is forced to 'none'); `depth` is
      the number of blocks up to the feature layer: CLIP depth - 1 for LLaVA's
      penultimate-layer features.
    language_model: `DecoderLM` kwargs.
    image_token_id: the token id whose positions receive the image features.
    projector_kind: 'linear' (LLaVA-1) or 'mlp' (LLaVA-1.5).
    projector_bias: whether the projector's Dense layers have biases.
  Params: `vision_tower` (ViT), `projector` (`fc1`, and `fc2` for 'mlp'), `lm` (DecoderLM).
  """
  vision: dict
  language_model: dict
  image_token_id: int
  projector_kind: str = 'mlp'
  projector_bias: bool = True
  dtype: layers.Dtype = jnp.float32

  def __post_init__(self):
    layers.freeze_dict_fields(self, 'vision', 'language_model')
    super().__post_init__()

  def setup(self):
    if self.projector_kind not in PROJECTOR_KINDS:
      raise ValueError(f'projector_kind must be one of {PROJECTOR_KINDS}, got '
                       f'{self.projector_kind!r}')
    self.vision_tower = ViT(**dict(self.vision, pool='none'), dtype=self.dtype)
    self.projector = Projector(self.projector_kind, self.language_model['width'],
                               self.projector_bias, self.dtype)
    self.lm = DecoderLM(**self.language_model, dtype=self.dtype)

  def vision_features(self, images):
    """`[batch, size, size, 3]` -> `[batch, patches, vision_width]` (`ViT.patch_features`)."""
    return self.vision_tower.patch_features(images)

  def image_features(self, images):
    """`[batch, size, size, 3]` -> projected features `[batch, patches, lm_width]`."""
    return self.projector(self.vision_features(images))

  def embed(self, tokens):
    """`[batch, length]` int -> the LM's token embeddings `[batch, length, lm_width]`."""
    return self.lm.embed(tokens)

  def _splice(self, tokens, features, image_tokens_seen=None):
    """Token embeddings of `tokens [batch, length]` with the image features `[batch, patches,
    lm_width]` spliced in: the k-th `image_token_id` of a row, counting `image_tokens_seen
    [batch]` earlier ones (default 0), becomes feature k; image tokens past the last feature
    keep their token embedding."""
    embeddings = self.lm.embed(tokens)
    features = features.astype(embeddings.dtype)
    is_image = tokens == self.image_token_id
    feature_index = jnp.cumsum(is_image, axis=1) - 1
    if image_tokens_seen is not None:
      feature_index = feature_index + image_tokens_seen[:, None]
    patches = features.shape[1]
    spliced = jnp.take_along_axis(features, jnp.clip(feature_index, 0, patches - 1)[..., None],
                                  axis=1)
    embeddings = jnp.where((is_image & (feature_index < patches))[..., None], spliced,
                           embeddings)
    return nn.with_logical_constraint(embeddings, ('act_batch', 'act_length', 'act_embed'))

  def embed_inputs(self, tokens, images):
    """Token embeddings `[batch, length, lm_width]` with the image features spliced in.

    Contract (as Hugging Face's LLaVA processor expands `<image>`): row i of `tokens
    [batch, length]` holds exactly `patches` copies of `image_token_id` (anywhere, not
    necessarily contiguous), and the k-th of them is replaced by feature k of
    `images[i]`. Under jit this is not checked: with fewer copies the last features are
    left out, with more the copies past the last feature keep their token embedding.
    """
    return self._splice(tokens, self.image_features(images))

  def __call__(self, images, tokens, *, positions=None, kv_mask=None):
    """Logits `[batch, length, vocab]` float32; `positions`, `kv_mask` as in `DecoderLM`."""
    logits, _ = self.lm(embeddings=self.embed_inputs(tokens, images), positions=positions,
                        kv_mask=kv_mask)
    return logits

  @nn.nowrap
  def init_cache(self, batch: int, max_len: int, dtype=None) -> dict:
    """`{'lm': DecoderLM.init_cache(batch, max_len, dtype), 'image_tokens_seen': zeros [batch]
    int32}`, the empty cache of `decode`. Works on an unbound module."""
    lm = DecoderLM(**self.language_model, dtype=self.dtype, parent=None)
    return {'lm': lm.init_cache(batch, max_len, dtype),
            'image_tokens_seen': jnp.zeros(batch, jnp.int32)}

  def decode(self, tokens=None, *, embeddings=None, context=None, positions=None, kv_mask=None,
             cache=None, cache_index=None):
    """(logits `[batch, length, vocab]` float32, new cache or None): the
    `mmjax.generate.Decoder` step.

    `context`: the projected image features `[batch, patches, lm_width]` (`image_features`),
    spliced in at the image tokens of `tokens` as `embed_inputs` does, counting the cache's
    `image_tokens_seen` (which grows by the call's image tokens); None reads `tokens` as
    text. `embeddings [batch, length, lm_width]` (features already spliced in) take no
    context. `positions`, `kv_mask`, `cache_index` as in `DecoderLM`; `cache` is
    `init_cache`'s or an earlier call's, or None (the whole sequence, no cache).
    """
    if embeddings is not None and context is not None:
      raise ValueError('pass context with tokens; embeddings hold their image features')
    seen = None if cache is None else cache['image_tokens_seen']
    if embeddings is None:
      embeddings = (self.lm.embed(tokens) if context is None
                    else self._splice(tokens, context, seen))
    logits, lm_cache = self.lm(embeddings=embeddings, positions=positions, kv_mask=kv_mask,
                               cache=None if cache is None else cache['lm'],
                               cache_index=cache_index)
    if cache is None:
      return logits, None
    if tokens is not None:
      seen = seen + jnp.sum(tokens == self.image_token_id, axis=1, dtype=jnp.int32)
    return logits, {'lm': lm_cache, 'image_tokens_seen': seen}

  @nn.nowrap
  def check_prompt(self, tokens, mask, context=None):
    """`mmjax.generate.Decoder.check_prompt` (host-side; works on an unbound module).

    Args:
      tokens: `[batch, prompt]` int (numpy).
      mask: `[batch, prompt]` bool, True on real tokens.
      context: the image features `[batch, patches, lm_width]`, or None (text only).

    Raises:
      ValueError: a real token outside the LM's vocabulary (`check_prompt_tokens`), or,
        with a context, a row with more image tokens than it has features (those past the
        last feature would silently keep their token embedding), naming the row.
    """
    check_prompt_tokens(tokens, mask, self.language_model['vocab_size'])
    if context is None:
      return
    patches = context.shape[1]
    counts = np.sum((np.asarray(tokens) == self.image_token_id) & np.asarray(mask, bool), axis=1)
    if (counts > patches).any():
      row = np.flatnonzero(counts > patches)[0]
      raise ValueError(f'prompt row {row} has {counts[row]} image tokens (id '
                       f'{self.image_token_id}) but the image features (context) hold '
                       f'{patches} patches')

  def vision_params_from_clip(self, clip_image_params) -> dict:
    """One of our CLIP checkpoints' `image_tower` params -> `vision_tower` params here
    (`vit.vision_params_from_clip` at this model's vision depth and scan). Works on an
    unbound module: `LLaVA(...).vision_params_from_clip(clip_params['image_tower'])`."""
    return vision_params_from_clip(clip_image_params, depth=self.vision['depth'],
                                   scan=self.vision.get('scan', True))
