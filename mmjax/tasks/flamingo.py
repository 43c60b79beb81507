"""Flamingo task: a frozen LM learns to read images through resampled latents, on interleaved
image-text sequences.

Rows `[BOS] (<image> 'an emoji of <name>.' [EOC]) * K [PAD]...` with images `[b, K, S, S, 3]`
(`mmjax.data.interleaved`) go through the model `mmjax.models.flamingo.Flamingo` (frozen
vision tower, Perceiver resampler, media projection, the LM reading the media through gated
cross-attention blocks; each token sees its latest image). Loss: next-token cross-entropy on
the caption tokens. `config.trainable` trains the resampler, the projection and the gated
blocks; the LM and the vision tower stay frozen.

Params: `{'vision_tower', 'resampler', 'media_projection' (if widths differ), 'lm',
'gated_xattn'}`; `lm` is a `DecoderLM` tree, so a text-only LLaVA run's LM loads by name
(`config.init.lm_from`), and `vision_tower` is cut from a CLIP run (`config.init.vision_from`)
as LLaVA's. Evaluation: few-shot ranking of candidate names, or the name written after the
prompt (`answer`, generation with a KV cache) (`mmjax.evals.fewshot`).
"""

import jax
import jax.numpy as jnp

from mmjax import config_lib
from mmjax import generate
from mmjax import losses
from mmjax.data import interleaved
from mmjax.data import pipeline
from mmjax.data.tokenizers import ByteLMTokenizer
from mmjax.evals import capabilities
from mmjax.models.flamingo import Flamingo
from mmjax.tasks import language_model_checks
from mmjax.tasks import pretrained
from mmjax.tasks.base import Task


def build_model(config) -> Flamingo:
  model = config.model
  return Flamingo(
      vision=dict(model.vision), perceiver=dict(model.resampler),
      language_model=dict(model.language_model), media_token_id=ByteLMTokenizer.image_id,
      cross_attn_every=model.cross_attn_every,
      only_attend_immediate_media=model.only_attend_immediate_media,
      xattn_heads=model.xattn_heads, xattn_head_dim=model.xattn_head_dim,
      xattn_mlp_ratio=model.xattn_mlp_ratio, dtype=jnp.dtype(config.compute_dtype))


class FlamingoTask(Task):
  """Interleaved emoji images and captions -> next caption tokens; loss on caption tokens."""

  def __init__(self, config):
    super().__init__(config)
    self.model = build_model(config)
    self.tokenizer = ByteLMTokenizer()
    self.data_dir = config_lib.data_dir(config)

  @classmethod
  def validate_config(cls, config):
    data, model = config.data, config.model
    language_model_checks.check_language_model(config)
    depth = model.language_model.depth
    if depth % model.cross_attn_every:
      raise ValueError(f'config.model.cross_attn_every={model.cross_attn_every} does not '
                       f'divide config.model.language_model.depth={depth}')
    language_model_checks.check_image_size(config)
    if data.images_per_sequence < 1:
      raise ValueError(f'config.data.images_per_sequence={data.images_per_sequence} must be '
                       'positive')
    try:
      interleaved.load_curriculum(data.curriculum)
    except (OSError, ValueError, TypeError) as e:
      raise ValueError(f'config.data.curriculum={data.curriculum!r}: {e}') from e

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
    return self.model.init_params(rng, spec['image'], spec['tokens'])

  def logits(self, params, batch):
    """`[b, L, vocab]` next-token logits of the rows `batch['tokens']` with `batch['image']`."""
    return self.model.apply({'params': params}, batch['image'], batch['tokens'])

  def loss(self, params, batch, rng):
    del rng  # no dropout
    return losses.lm_cross_entropy(self.logits(params, batch), batch['targets'],
                                   batch['loss_weights'], z_loss=self.config.loss.z_loss)

  def score(self, params, batch):
    """float32 [b]: the mean log-probability of each row's weighted targets (`batch`: image,
    tokens, targets, loss_weights as in training)."""
    log_probs = jax.nn.log_softmax(self.logits(params, batch), axis=-1)
    target_log_probs = jnp.take_along_axis(log_probs, batch['targets'][..., None], -1)[..., 0]
    weights = batch['loss_weights']
    return (jnp.sum(weights * target_log_probs, axis=1)
            / jnp.maximum(jnp.sum(weights, axis=1), 1.0))

  def answer(self, params, batch):
    """int32 [b, generation.max_new_tokens]: greedy continuations of the left-padded prompts
    `batch['prompt_tokens'] [b, P]` (`prompt_mask [b, P]`) with their images `batch['image']
    [b, K, S, S, 3]` (one per `<image>` token), through the KV cache (`mmjax.generate`); each
    row ends at its end of chunk, pad (0) after it."""
    variables = {'params': params}
    return generate.generate(
        self.model, variables, prompt_tokens=batch['prompt_tokens'],
        prompt_mask=batch['prompt_mask'],
        context=self.model.apply(variables, batch['image'], method=self.model.media),
        max_new_tokens=self.config.generation.max_new_tokens,
        stop_tokens=(self.tokenizer.eos_id,), pad_id=self.tokenizer.pad_id)['tokens']

  def image_embedding(self, params, images):
    """`images [b, S, S, 3]` -> float32 [b, vision_width]: the frozen vision tower's features
    averaged over patches, as unit vectors (few-shot demonstration retrieval)."""
    return self.model.apply({'params': params}, images, method=self.model.image_embedding)

  def capabilities(self):
    return capabilities.Capabilities(
        scorer=capabilities.Scorer(self.score), generator=capabilities.Generator(self.answer),
        image_embedder=capabilities.ImageEmbedder(self.image_embedding))

  def eval_data(self):
    return capabilities.EvalData(data_dir=self.data_dir, image_size=self.config.data.image_size,
                                 dataset='emoji', tokenizer=self.tokenizer)

  def train_iterator(self, *, process_index, process_count):
    data = self.config.data
    pipeline.build('emoji', self.data_dir)
    return interleaved.train_iterator(
        self.data_dir, tokenizer=self.tokenizer, images_per_sequence=data.images_per_sequence,
        max_len=data.max_len, image_size=data.image_size,
        global_batch_size=self.config.batch_size, seed=self.config.seed,
        process_index=process_index, process_count=process_count,
        worker_count=data.worker_count, augment=data.augment, repeat_prob=data.repeat_prob,
        curriculum=interleaved.load_curriculum(data.curriculum))

  def train_data_identity(self):
    return {'emoji': pipeline.dataset_identity('emoji', self.data_dir),
            'curriculum': self.config.data.curriculum}

  def pretrained_params(self):
    """Top-level param subtrees from `config.init` workdirs, as numpy (`tasks.pretrained`)."""
    return pretrained.init_parts(self.config.init, self.config.model.vision)

