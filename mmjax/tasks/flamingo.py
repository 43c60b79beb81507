"""Flamingo task: a frozen LM learns to read images through resampled latents, on interleaved
image-text sequences.

Rows `[BOS] (<image> 'an emoji of <name>.' [EOC]) * K [PAD]...` with images `[b, K, S, S, 3]`
(`mmjax.data.interleaved`). Each image goes through the frozen vision tower (our ViT,
`pool='none'`, class token dropped: LLaVA's features), the Perceiver resampler
(`mmjax.models.resampler`) and, when the widths differ, a linear `media_projection` to the LM
width; the text reads the media through the gated cross-attention blocks of
`mmjax.models.flamingo` (each token sees its latest image). Loss: next-token cross-entropy on
the caption tokens. `config.trainable` trains the resampler, the projection and the gated
blocks; the LM and the vision tower stay frozen.

Params: `{'vision_tower', 'resampler', 'media_projection' (if widths differ), 'lm',
'gated_xattn'}`; `lm` is a `DecoderLM` tree, so a text-only LLaVA run's LM loads by name
(`config.init.lm_from`), and `vision_tower` is cut from a CLIP run (`config.init.vision_from`)
as LLaVA's. Evaluation: few-shot ranking of candidate names, or the name written after the
prompt (`answer_fn`, generation with a KV cache) (`mmjax.evals.fewshot`).
"""

import json
import os

import jax
import jax.numpy as jnp

from mmjax import config_lib
from mmjax import evals
from mmjax import generate
from mmjax import losses
from mmjax.data import instruct
from mmjax.data import interleaved
from mmjax.models import layers
from mmjax.models.flamingo import Flamingo
from mmjax.models.resampler import PerceiverResampler
from mmjax.models.vit import ViT
from mmjax.tasks import pretrained
from mmjax.tasks.base import Task


class FlamingoTask(Task):
  """Interleaved emoji images and captions -> next caption tokens; loss on caption tokens."""

  def __init__(self, config):
    super().__init__(config)
    model, dtype = config.model, jnp.dtype(config.compute_dtype)
    self.lm_width = model.language_model.width
    self.vision_tower = ViT(**dict(model.vision, pool='none'), dtype=dtype)
    self.resampler = PerceiverResampler(**model.resampler, dtype=dtype)
    self.media_projection = None
    if model.vision.width != self.lm_width:
      self.media_projection = layers.Dense(self.lm_width, ('embed', None), dtype=dtype)
    self.flamingo = Flamingo(
        language_model=dict(model.language_model), media_token_id=instruct.IMAGE_ID,
        cross_attn_every=model.cross_attn_every,
        only_attend_immediate_media=model.only_attend_immediate_media,
        xattn_heads=model.xattn_heads, xattn_head_dim=model.xattn_head_dim,
        xattn_mlp_ratio=model.xattn_mlp_ratio, dtype=dtype)
    self.tokenizer = instruct.ByteLMTokenizer()
    self.data_dir = config_lib.data_dir(config)
    instruct.build(self.data_dir, ['emoji_name'])

  @classmethod
  def validate_config(cls, config):
    data, model = config.data, config.model
    lm = model.language_model
    if lm.vocab_size < instruct.VOCAB_SIZE:
      raise ValueError(f'config.model.language_model.vocab_size={lm.vocab_size} is smaller '
                       f'than the tokenizer vocabulary ({instruct.VOCAB_SIZE})')
    if lm.depth % model.cross_attn_every:
      raise ValueError(f'config.model.cross_attn_every={model.cross_attn_every} does not '
                       f'divide config.model.language_model.depth={lm.depth}')
    if lm.num_heads % lm.num_kv_heads:
      raise ValueError(f'config.model.language_model.num_heads={lm.num_heads} is not a '
                       f'multiple of num_kv_heads={lm.num_kv_heads}')
    if data.image_size % model.vision.patch_size:
      raise ValueError(f'config.data.image_size={data.image_size} is not divisible by '
                       f'config.model.vision.patch_size={model.vision.patch_size}')
    if data.images_per_sequence < 1:
      raise ValueError(f'config.data.images_per_sequence={data.images_per_sequence} must be '
                       'positive')

  def batch_spec(self, batch_size):
    data = self.config.data
    size, length = data.image_size, data.max_len
    rows = jax.ShapeDtypeStruct((batch_size, length), jnp.int32)
    return {'image': jax.ShapeDtypeStruct(
                (batch_size, data.images_per_sequence, size, size, 3), jnp.float32),
            'tokens': rows, 'targets': rows,
            'loss_weights': jax.ShapeDtypeStruct((batch_size, length), jnp.float32)}

  def init(self, rng):
    spec = self.batch_spec(1)
    vision_rng, resampler_rng, projection_rng, flamingo_rng = jax.random.split(rng, 4)
    images = jnp.zeros(spec['image'].shape, jnp.float32)
    params = {'vision_tower': self.vision_tower.init(vision_rng, images[:, 0])['params']}
    features = jnp.zeros((1, 1) + self._feature_shape(params), jnp.float32)
    params['resampler'] = self.resampler.init(resampler_rng, features)['params']
    latents = (1, 1, self.resampler.num_latents, self.config.model.vision.width)
    if self.media_projection:
      params['media_projection'] = self.media_projection.init(
          projection_rng, jnp.zeros(latents, jnp.float32))['params']
    media = jnp.zeros(latents[:-1] + (self.lm_width,), jnp.float32)
    tokens = jnp.zeros(spec['tokens'].shape, jnp.int32)
    params.update(self.flamingo.init(flamingo_rng, tokens, media)['params'])
    return params

  def _feature_shape(self, params) -> tuple[int, int]:
    """(patches, vision_width) of the vision features of one image."""
    size = self.config.data.image_size
    return jax.eval_shape(lambda p: self._vision_features(p, jnp.zeros((1, size, size, 3))),
                          params).shape[1:]

  def _vision_features(self, params, images):
    """`[n, S, S, 3]` -> `[n, patches, vision_width]`: last block's tokens, class token dropped."""
    _, tokens = self.vision_tower.apply({'params': params['vision_tower']}, images)
    return tokens[:, 1:] if self.vision_tower.class_token else tokens

  def media(self, params, images):
    """Images `[b, K, S, S, 3]` -> media `[b, K, num_latents, lm_width]`."""
    batch, images_per_row = images.shape[:2]
    features = self._vision_features(params, images.reshape((-1,) + images.shape[2:]))
    features = features.reshape((batch, images_per_row) + features.shape[1:])
    media = self.resampler.apply({'params': params['resampler']}, features)
    if self.media_projection:
      media = self.media_projection.apply({'params': params['media_projection']}, media)
    return media

  def logits(self, params, batch):
    """`[b, L, vocab]` next-token logits of the rows `batch['tokens']` with `batch['image']`."""
    return self.flamingo.apply({'params': _flamingo_params(params)}, batch['tokens'],
                               self.media(params, batch['image']))

  def loss(self, params, batch, rng):
    del rng  # no dropout
    return losses.lm_cross_entropy(self.logits(params, batch), batch['targets'],
                                   batch['loss_weights'], z_loss=self.config.loss.z_loss)

  def score_fn(self, mesh):
    """`(params, batch) -> float32 [b]`: the mean log-probability of each row's weighted
    targets (`batch`: image, tokens, targets, loss_weights as in training)."""
    del mesh  # shards like training under the caller's mesh

    def score(params, batch):
      log_probs = jax.nn.log_softmax(self.logits(params, batch), axis=-1)
      target_log_probs = jnp.take_along_axis(log_probs, batch['targets'][..., None], -1)[..., 0]
      weights = batch['loss_weights']
      return (jnp.sum(weights * target_log_probs, axis=1)
              / jnp.maximum(jnp.sum(weights, axis=1), 1.0))

    return score

  def answer_fn(self, mesh):
    """`(params, batch) -> int32 [b, generation.max_new_tokens]`: greedy continuations of the
    left-padded prompts `batch['prompt_tokens'] [b, P]` (`prompt_mask [b, P]`) with their
    images `batch['image'] [b, K, S, S, 3]` (one per `<image>` token), through the KV cache
    (`mmjax.generate`); each row ends at its end of chunk, pad (0) after it."""
    del mesh  # generate shards like training under the caller's mesh

    def answer(params, batch):
      return generate.generate(
          self.flamingo, {'params': _flamingo_params(params)},
          prompt_tokens=batch['prompt_tokens'], prompt_mask=batch['prompt_mask'],
          media=self.media(params, batch['image']),
          max_new_tokens=self.config.generation.max_new_tokens,
          stop_tokens=(self.tokenizer.eos_id,), pad_id=self.tokenizer.pad_id)['tokens']

    return answer

  def image_embedding_fn(self, mesh):
    """`(params, images [b, S, S, 3]) -> float32 [b, vision_width]`: the frozen vision
    tower's features averaged over patches, as unit vectors (few-shot demonstration
    retrieval, `mmjax.evals.fewshot.RetrievedDemonstrations`)."""
    del mesh  # shards like training under the caller's mesh

    def embed(params, images):
      pooled = jnp.mean(self._vision_features(params, images), axis=1)
      return pooled / jnp.linalg.norm(pooled, axis=-1, keepdims=True)

    return embed

  def train_iterator(self, *, process_index, process_count):
    data = self.config.data
    return interleaved.train_iterator(
        self.data_dir, tokenizer=self.tokenizer, images_per_sequence=data.images_per_sequence,
        max_len=data.max_len, image_size=data.image_size,
        global_batch_size=self.config.batch_size, seed=self.config.seed,
        process_index=process_index, process_count=process_count,
        worker_count=data.worker_count, augment=data.augment, repeat_prob=data.repeat_prob,
        made_up_prob=data.get('made_up_prob', 0.0), cue_prob=data.get('cue_prob', 0.0),
        cue_at=data.get('cue_at', 'image'), cue_digits=data.get('cue_digits', 'per_sequence'),
        thing_digits=load_cue_table(data.get('cue_table', '')),
        repeat_last_only=data.get('repeat_last_only', False),
        same_drawing_prob=data.get('same_drawing_prob', 0.0))

  def evaluators(self, mesh):
    return evals.build(self.config.evals, self, mesh)

  def pretrained_params(self):
    """Top-level param subtrees from `config.init` workdirs, as numpy (`tasks.pretrained`)."""
    return pretrained.init_parts(self.config.init, self.config.model.vision)


def _flamingo_params(params) -> dict:
  """The `Flamingo` module's part of the task's params."""
  return {'lm': params['lm'], 'gated_xattn': params['gated_xattn']}


def load_cue_table(cue_table: str) -> dict[str, str] | None:
  """`data.cue_table`: '' (per-thing cues hash the name) or a JSON file {name: digit}."""
  if not cue_table:
    return None
  with open(os.path.expanduser(cue_table)) as f:
    table = json.load(f)
  bad = {name: digit for name, digit in table.items()
         if not (isinstance(digit, str) and len(digit) == 1 and digit.isdigit())}
  if bad:
    raise ValueError(f'data.cue_table={cue_table}: {len(bad)} values are not one digit, e.g. '
                     f'{list(bad.items())[:3]}')
  return table
