"""Chameleon task: one decoder trained on text -> image and image -> text rows in one vocabulary.

Rows (`mmjax.data.early_fusion`): emoji captions followed by the image's codes, and the image
question rows LLaVA trains on, the image as `[begin] codes [end]`. The frozen VQ tokenizer
(params `tokenizer`, loaded from a `configs/vq.py` run by `config.init.vq_from`) turns the
batch's images into codes inside the train step; they replace the `<image>` placeholders
of tokens and targets (`mmjax.models.chameleon.fill_placeholders`). The loss is next-token
cross-entropy over the weighted targets, code targets weighted `config.loss.image_weight`
and text targets `config.loss.text_weight`, plus z-loss; `text_loss` and `image_loss` are
each modality's own mean cross-entropy.

Params: `{'lm', 'tokenizer'}`; `config.trainable` ('lm/.*') keeps the tokenizer frozen.
"""

import jax
import jax.numpy as jnp
import ml_collections

from mmjax import config_lib
from mmjax import generate
from mmjax import losses
from mmjax import mixed_modal
from mmjax.data import early_fusion
from mmjax.data import instruct
from mmjax.data import pipeline
from mmjax.data.tokenizers.byte import BOS_ID, EarlyFusionTokenizer
from mmjax.evals import capabilities
from mmjax.models.chameleon import Chameleon, fill_placeholders
from mmjax.models import layers
from mmjax.models.decoder import NORM_PLACEMENTS
from mmjax.tasks import language_model_checks
from mmjax.tasks import clip as clip_task
from mmjax.tasks import pretrained
from mmjax.tasks import vq as vq_task
from mmjax.tasks.base import Task


def build_tokenizer(config) -> EarlyFusionTokenizer:
  return EarlyFusionTokenizer(config.model.vq.num_codes)


def build_model(config) -> Chameleon:
  tokenizer = build_tokenizer(config)
  return Chameleon(
      language_model=dict(config.model.language_model), vq=dict(config.model.vq),
      image_token_offset=tokenizer.image_token_offset, begin_image_id=tokenizer.begin_image_id,
      end_image_id=tokenizer.end_image_id, image_placeholder_id=tokenizer.image_id,
      dtype=jnp.dtype(config.compute_dtype))


def image_tokens_per_image(config) -> int:
  """The VQ latent grid's size: (image_size / 2**(levels - 1))**2."""
  side = config.data.image_size // 2 ** (len(config.model.vq.channel_multiplier) - 1)
  return side * side


class ChameleonTask(Task):
  """Text and image tokens in one sequence; loss on the weighted targets of both."""

  def __init__(self, config):
    super().__init__(config)
    self.tokenizer = build_tokenizer(config)
    self.model = build_model(config)
    self.data_dir = config_lib.data_dir(config)

  @classmethod
  def validate_config(cls, config):
    data, model = config.data, config.model
    early_fusion.select_kinds(dict(data.weights))  # names an unknown kind
    language_model_checks.check_language_model(config)
    vocab = EarlyFusionTokenizer(model.vq.num_codes).vocab_size
    if model.language_model.vocab_size != vocab:
      raise ValueError(f'config.model.language_model.vocab_size='
                       f'{model.language_model.vocab_size} must be {vocab}: 262 byte-level '
                       f'ids and markers + config.model.vq.num_codes={model.vq.num_codes}')
    if model.language_model.norm_placement not in NORM_PLACEMENTS:
      raise ValueError(f'config.model.language_model.norm_placement='
                       f'{model.language_model.norm_placement!r}; use one of {NORM_PLACEMENTS}')
    if model.vq.resolution != data.image_size:
      raise ValueError(f'config.model.vq.resolution={model.vq.resolution} must equal '
                       f'config.data.image_size={data.image_size}')
    if data.num_image_tokens != image_tokens_per_image(config):
      raise ValueError(f'config.data.num_image_tokens={data.num_image_tokens} must be '
                       f'{image_tokens_per_image(config)}, the VQ latent grid of '
                       f'image_size {data.image_size}')
    if not 0 <= data.caption_dropout < 1:
      raise ValueError(f'config.data.caption_dropout={data.caption_dropout} must be in [0, 1)')
    for key in ('text_weight', 'image_weight'):
      if config.loss[key] < 0:
        raise ValueError(f'config.loss.{key}={config.loss[key]} must be >= 0')

  def batch_spec(self, batch_size):
    size, length = self.config.data.image_size, self.config.data.max_len
    rows = jax.ShapeDtypeStruct((batch_size, length), jnp.int32)
    return {'image': jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.float32),
            'tokens': rows, 'targets': rows,
            'loss_weights': jax.ShapeDtypeStruct((batch_size, length), jnp.float32)}

  def init(self, rng):
    spec = self.batch_spec(1)
    return self.model.init(rng, jnp.zeros(spec['tokens'].shape, jnp.int32),
                           jnp.zeros(spec['image'].shape, jnp.float32),
                           method='initialize')['params']

  def sequences(self, params, batch):
    """(tokens, targets) `[b, L]` of the batch with its images' codes in place of the
    placeholders."""
    codes = self.model.apply({'params': params}, batch['image'], method='image_tokens')
    fill = lambda ids: fill_placeholders(ids, codes, self.tokenizer.image_id)
    return fill(batch['tokens']), fill(batch['targets'])

  def loss(self, params, batch, rng):
    config = self.config
    tokens, targets = self.sequences(params, batch)
    logits, _ = self.model.apply({'params': params}, tokens, rngs={'dropout': rng})
    is_image = self.model.is_image_token(targets)
    weights = batch['loss_weights'] * jnp.where(is_image, config.loss.image_weight,
                                                config.loss.text_weight)
    loss, metrics = losses.lm_cross_entropy(logits, targets, weights, z_loss=config.loss.z_loss)
    for name, part in (('text', ~is_image), ('image', is_image)):
      _, part_metrics = losses.lm_cross_entropy(logits, targets, batch['loss_weights'] * part)
      metrics[f'{name}_loss'] = part_metrics['cross_entropy']
    metrics['logsumexp'] = jnp.sum(batch['loss_weights'] * jax.nn.logsumexp(logits, -1)) / (
        jnp.maximum(jnp.sum(batch['loss_weights']), 1.0))
    return loss, metrics

  def train_iterator(self, *, process_index, process_count):
    data = self.config.data
    early_fusion.build(self.data_dir, early_fusion.select_kinds(dict(data.weights)))
    return early_fusion.train_iterator(
        self.data_dir, tokenizer=self.tokenizer, weights=dict(data.weights),
        num_image_tokens=data.num_image_tokens, max_len=data.max_len,
        image_size=data.image_size, global_batch_size=self.config.batch_size,
        seed=self.config.seed, caption_dropout=data.caption_dropout,
        process_index=process_index, process_count=process_count,
        worker_count=data.worker_count, augment=data.augment)

  def train_data_identity(self):
    kinds = early_fusion.select_kinds(dict(self.config.data.weights))
    datasets = sorted({instruct.QUESTION_KINDS[k].dataset if k in instruct.QUESTION_KINDS
                       else 'emoji' for k in kinds})
    return {'kinds': kinds,
            **{name: pipeline.dataset_identity(name, self.data_dir) for name in datasets}}

  def pretrained_params(self):
    """`tokenizer` from the VQ run `config.init.vq_from` (its saved model config must give
    `config.model.vq`), then `config.init`'s other parts (`tasks.pretrained`)."""
    init = self.config.init
    loaded = pretrained.init_parts(init)
    if init.vq_from:
      loaded['tokenizer'] = vq_tokenizer_params(init.vq_from, dict(self.config.model.vq))
    return loaded

  def answer(self, params, batch):
    """int32 [b, generation.max_new_tokens]: greedy answers to the left-padded prompts
    (`batch`: image, prompt_tokens with placeholders, prompt_mask); pad (0) after EOS."""
    variables = {'params': params}
    tokens = self.model.apply(variables, batch['prompt_tokens'], batch['image'],
                              method='image_token_ids')
    return generate.generate(
        self.model, variables, prompt_tokens=tokens, prompt_mask=batch['prompt_mask'],
        max_new_tokens=self.config.generation.max_new_tokens,
        stop_tokens=(self.tokenizer.eos_id,), pad_id=self.tokenizer.pad_id)['tokens']

  def modality_rules(self) -> mixed_modal.ModalityRules:
    """Generation's rules: whole images of `num_image_tokens` codes, drawn with
    `config.generation`'s image sampling and guidance; no `<image>` or padding."""
    generation, tokenizer = self.config.generation, self.tokenizer
    return mixed_modal.ModalityRules(
        image_token_offset=tokenizer.image_token_offset, num_codes=tokenizer.num_codes,
        begin_image_id=tokenizer.begin_image_id, end_image_id=tokenizer.end_image_id,
        image_length=self.config.data.num_image_tokens,
        banned_ids=(tokenizer.pad_id, tokenizer.image_id),
        image_sampling=generate.Sampling(temperature=generation.image_temperature,
                                         top_k=generation.image_top_k),
        guidance_scale=generation.guidance_scale)

  def generate_images(self, params, batch):
    """`capabilities.ImageGenerator.generate`: float32 images [b, S, S, 3] continuing the
    text -> image prompts of `batch` (ending in begin-image); guided, each row is paired
    with the unconditional prompt `[BOS] [begin]`."""
    rules, variables = self.modality_rules(), {'params': params}
    tokens, mask = batch['prompt_tokens'], batch['prompt_mask']
    if rules.guided:
      unconditional = jnp.array([BOS_ID, self.tokenizer.begin_image_id], jnp.int32)
      tokens = jnp.concatenate([tokens, jnp.zeros_like(tokens).at[:, -2:].set(unconditional)])
      mask = jnp.concatenate([mask, jnp.zeros_like(mask).at[:, -2:].set(True)])
    length = rules.image_length
    generated = generate.generate(
        self.model, variables, prompt_tokens=tokens, prompt_mask=mask,
        max_new_tokens=length + 1, modalities=rules, rng=jax.random.key(batch['seed'][0]),
        pad_id=self.tokenizer.pad_id)['tokens']
    return self.model.apply(variables, generated[:, :length], method='decode_images')

  def score(self, params, batch):
    """`capabilities.Scorer.score`: float32 [b], the mean log-probability of each row's
    weighted targets (placeholders filled with the codes of `batch['image']`)."""
    tokens, targets = self.sequences(params, batch)
    logits, _ = self.model.apply({'params': params}, tokens)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    target_log_probs = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    weights = batch['loss_weights']
    return jnp.sum(weights * target_log_probs, 1) / jnp.maximum(jnp.sum(weights, 1), 1.0)

  def token_statistics(self, params, batch):
    """`capabilities.TokenStatistics.statistics` of the rows of `batch` (placeholders
    filled with the codes of `batch['image']`)."""
    tokens, targets = self.sequences(params, batch)
    (logits, _), sown = self.model.apply({'params': params}, tokens,
                                         mutable=[layers.DIAGNOSTICS])
    logits = logits.astype(jnp.float32)
    logsumexp = jax.nn.logsumexp(logits, axis=-1)
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    # Each attention call sowed [batch] (scanned blocks: [layers, batch]).
    per_call = [leaf.reshape(-1, tokens.shape[0]) for leaf in jax.tree.leaves(sown)]
    return {'log_prob': target_logits - logsumexp, 'logsumexp': logsumexp,
            'is_image': self.model.is_image_token(targets),
            'max_attention_logit': jnp.max(jnp.concatenate(per_call), axis=0)}

  def judge(self):
    """`capabilities.Judge` of the CLIP run `config.judge.clip_workdir` (None if '')."""
    workdir = self.config.judge.clip_workdir
    if not workdir:
      return None
    clip_config = ml_collections.ConfigDict(pretrained.newest_config(workdir))
    if clip_config.data.image_size != self.config.data.image_size:
      raise ValueError(f'config.judge.clip_workdir={workdir!r} reads {clip_config.data.image_size}'
                       f' px images; this model draws {self.config.data.image_size} px')
    dual_encoder = clip_task.ClipTask(clip_config).capabilities().dual_encoder
    return capabilities.Judge(dual_encoder, pretrained.newest_params(workdir))

  def capabilities(self):
    return capabilities.Capabilities(
        generator=capabilities.Generator(self.answer), scorer=capabilities.Scorer(self.score),
        token_statistics=capabilities.TokenStatistics(self.token_statistics),
        image_generator=capabilities.ImageGenerator(self.generate_images), judge=self.judge())

  def eval_data(self):
    data = self.config.data
    return capabilities.EvalData(data_dir=self.data_dir, image_size=data.image_size,
                                 tokenizer=self.tokenizer, num_image_tokens=data.num_image_tokens,
                                 prompt_len=data.prompt_len)


def vq_tokenizer_params(workdir: str, vq_kwargs: dict) -> dict:
  """The VQModel params of the newest checkpoint of the `configs/vq.py` run in `workdir`.

  Raises ValueError naming each `config.model.vq` key whose value differs from what that
  run trained (`tasks.vq.model_kwargs` of the config saved with its checkpoint).
  """
  trained = vq_task.model_kwargs(ml_collections.ConfigDict(pretrained.newest_config(workdir)))
  same = lambda a, b: tuple(a) == tuple(b) if isinstance(a, (list, tuple)) else a == b
  differ = [key for key in trained
            if key not in vq_kwargs or not same(vq_kwargs[key], trained[key])]
  if differ:
    raise ValueError(f'config.init.vq_from={workdir!r} trained another tokenizer: ' + ', '.join(
        f'config.model.vq.{key}={vq_kwargs.get(key)!r} vs {trained[key]!r}' for key in differ))
  return vq_task.VQTask.tokenizer_params(pretrained.newest_params(workdir))
