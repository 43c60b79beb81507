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
    embeddings = model.apply({'params': params}, tokens, images, method=model.embed_inputs)
    generate.generate(DecoderLM(**model.language_model, dtype=model.dtype),
                      {'params': params['lm']}, prompt_embeddings=embeddings, ...)
"""

import flax.linen as nn
import jax.numpy as jnp

from mmjax.models import layers
from mmjax.models.decoder import DecoderLM
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

  def setup(self):
    if self.projector_kind not in PROJECTOR_KINDS:
      raise ValueError(f'projector_kind must be one of {PROJECTOR_KINDS}, got '
                       f'{self.projector_kind!r}')
    self.vision_tower = ViT(**dict(self.vision, pool='none'), dtype=self.dtype)
    self.projector = Projector(self.projector_kind, self.language_model['width'],
                               self.projector_bias, self.dtype)
    self.lm = DecoderLM(**self.language_model, dtype=self.dtype)

  def vision_features(self, images):
    """`[batch, size, size, 3]` -> `[batch, patches, vision_width]`: the last block's tokens
    (no `ln_post`), class token dropped."""
    _, tokens = self.vision_tower(images)
    return tokens[:, 1:] if self.vision_tower.class_token else tokens

  def image_features(self, images):
    """`[batch, size, size, 3]` -> projected features `[batch, patches, lm_width]`."""
    return self.projector(self.vision_features(images))

  def embed_inputs(self, tokens, images):
    """Token embeddings `[batch, length, lm_width]` with the image features spliced in.

    Contract (as Hugging Face's LLaVA processor expands `<image>`): row i of `tokens
    [batch, length]` holds exactly `patches` copies of `image_token_id` (anywhere, not
    necessarily contiguous), and the k-th of them is replaced by feature k of
    `images[i]`. Under jit this is not checked: with fewer copies the last features are
    left out, with more the last feature repeats.
    """
    embeddings = self.lm.embed(tokens)
    features = self.image_features(images).astype(embeddings.dtype)
    is_image = tokens == self.image_token_id
    feature_index = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, features.shape[1] - 1)
    spliced = jnp.take_along_axis(features, feature_index[..., None], axis=1)
    embeddings = jnp.where(is_image[..., None], spliced, embeddings)
    return nn.with_logical_constraint(embeddings, ('act_batch', 'act_length', 'act_embed'))

  def __call__(self, images, tokens, *, positions=None, kv_mask=None):
    """Logits `[batch, length, vocab]` float32; `positions`, `kv_mask` as in `DecoderLM`."""
    logits, _ = self.lm(embeddings=self.embed_inputs(tokens, images), positions=positions,
                        kv_mask=kv_mask)
    return logits

  def vision_params_from_clip(self, clip_image_params) -> dict:
    """One of our CLIP checkpoints' `image_tower` params -> `vision_tower` params here
    (`vit.vision_params_from_clip` at this model's vision depth and scan). Works on an
    unbound module: `LLaVA(...).vision_params_from_clip(clip_params['image_tower'])`."""
    return vision_params_from_clip(clip_image_params, depth=self.vision['depth'],
                                   scan=self.vision.get('scan', True))
