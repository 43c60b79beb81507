"""LLaVA task: answer questions about images with a decoder LM that reads projected features.

Rows `[BOS] [IMAGE]*n 'question: <q> answer: ' <answer> [EOS]` (`mmjax.data.instruct`); the
image-token positions receive the projected vision features (`mmjax.models.llava`) and the
loss is next-token cross-entropy on the answer tokens only. `config.text_only` trains the
same decoder on the same rows without image tokens: the baseline that shows what the
image adds. Which params train is `config.trainable` (stage 1: the projector, stage 2:
projector + LM; `configs/llava.py`). Evaluation generates greedy answers with the KV-cache
decoder (`mmjax.generate`) and scores them (`mmjax.evals.captioning`).

Params: `{'vision_tower', 'projector', 'lm'}`, or `{'lm'}` with `text_only`, so an LM trained
text-only loads into LLaVA by name (`config.init.lm_from`).
"""

import jax
import jax.numpy as jnp

from mmjax import config_lib
from mmjax import generate
from mmjax import losses
from mmjax.data import instruct
from mmjax.data import pipeline
from mmjax.data.tokenizers import ByteLMTokenizer
from mmjax.evals import capabilities
from mmjax.models.decoder import DecoderLM
from mmjax.models.llava import LLaVA, PROJECTOR_KINDS
from mmjax.tasks import language_model_checks
from mmjax.tasks import pretrained
from mmjax.tasks.base import Task


def build_model(config) -> LLaVA:
  model = config.model
  return LLaVA(vision=dict(model.vision), language_model=dict(model.language_model),
               image_token_id=model.image_token_id, projector_kind=model.projector_kind,
               projector_bias=model.projector_bias, dtype=jnp.dtype(config.compute_dtype))


def build_lm(config) -> DecoderLM:
  return DecoderLM(**config.model.language_model, dtype=jnp.dtype(config.compute_dtype))


class LlavaTask(Task):
  """Images + questions -> answers; loss on answer tokens."""

  def __init__(self, config):
    super().__init__(config)
    self.text_only = config.text_only
    self.model = None if self.text_only else build_model(config)
    self.lm = build_lm(config)
    self.tokenizer = ByteLMTokenizer()
    self.data_dir = config_lib.data_dir(config)

  @classmethod
  def validate_config(cls, config):
    data, model = config.data, config.model
    unknown = sorted(set(data.weights) - set(instruct.QUESTION_KINDS))
    if unknown:
      raise ValueError(f'config.data.weights has unknown question kinds {unknown}; use some of '
                       f'{list(instruct.QUESTION_KINDS)}')
    if any(weight < 0 for weight in data.weights.values()):
      raise ValueError(f'config.data.weights={dict(data.weights)}: weights must be >= 0')
    if not any(weight > 0 for weight in data.weights.values()):
      raise ValueError(f'config.data.weights={dict(data.weights)} gives no question kind a '
                       'positive weight')
    language_model_checks.check_language_model(config)
    if model.image_token_id != ByteLMTokenizer.image_id:
      raise ValueError(f'config.model.image_token_id={model.image_token_id} must be the '
                       f'tokenizer image id {ByteLMTokenizer.image_id}')
    if model.projector_kind not in PROJECTOR_KINDS:
      raise ValueError(f'config.model.projector_kind={model.projector_kind!r}; use one of '
                       f'{PROJECTOR_KINDS}')
    language_model_checks.check_image_size(config)
    patches = 0 if config.text_only else (data.image_size // model.vision.patch_size) ** 2
    if data.num_image_tokens != patches:
      raise ValueError(f'config.data.num_image_tokens={data.num_image_tokens} must be '
                       f'{patches} (' + ('text_only' if config.text_only else
                                         '(image_size / patch_size)**2') + ')')
    if config.text_only and (config.init.vision_from or config.init.params_from):
      raise ValueError('config.text_only has no vision tower: config.init.vision_from and '
                       'config.init.params_from must be empty')

  def batch_spec(self, batch_size):
    size, length = self.config.data.image_size, self.config.data.max_len
    rows = jax.ShapeDtypeStruct((batch_size, length), jnp.int32)
    return {'image': jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.float32),
            'tokens': rows, 'targets': rows,
            'loss_weights': jax.ShapeDtypeStruct((batch_size, length), jnp.float32)}

  def init(self, rng):
    spec = self.batch_spec(1)
    tokens = jnp.zeros(spec['tokens'].shape, jnp.int32)
    if self.text_only:
      return {'lm': self.lm.init(rng, tokens)['params']}
    images = jnp.zeros(spec['image'].shape, jnp.float32)
    return self.model.init(rng, images, tokens)['params']

  def logits(self, params, batch):
    """`[batch, length, vocab]` next-token logits of the training rows."""
    if self.text_only:
      logits, _ = self.lm.apply({'params': params['lm']}, batch['tokens'])
      return logits
    return self.model.apply({'params': params}, batch['image'], batch['tokens'])

  def loss(self, params, batch, rng):
    del rng  # no dropout
    return losses.lm_cross_entropy(self.logits(params, batch), batch['targets'],
                                   batch['loss_weights'], z_loss=self.config.loss.z_loss)

  def train_iterator(self, *, process_index, process_count):
    data = self.config.data
    instruct.build(self.data_dir, instruct.select_kinds(data.weights))
    return instruct.train_iterator(
        self.data_dir, tokenizer=self.tokenizer, weights=dict(data.weights),
        num_image_tokens=data.num_image_tokens, max_len=data.max_len,
        image_size=data.image_size, global_batch_size=self.config.batch_size,
        seed=self.config.seed, process_index=process_index, process_count=process_count,
        worker_count=data.worker_count, augment=data.augment)

  def train_data_identity(self):
    """The datasets of the question kinds installed here, and those kinds' weights: a
    machine without a kind's apt package trains on another mix."""
    kinds = instruct.select_kinds(self.config.data.weights)
    datasets = sorted({instruct.QUESTION_KINDS[kind].dataset for kind in kinds})
    return {'kinds': kinds,
            **{name: pipeline.dataset_identity(name, self.data_dir) for name in datasets}}

  def answer(self, params, batch):
    """int32 [b, generation.max_new_tokens]: greedy answers to the left-padded prompts
    (`batch`: image, prompt_tokens, prompt_mask) through the KV cache; pad (0) after EOS."""
    if self.text_only:
      model, variables, context = self.lm, {'params': params['lm']}, None
    else:
      model, variables = self.model, {'params': params}
      context = model.apply(variables, batch['image'], method=model.image_features)
    return generate.generate(
        model, variables, prompt_tokens=batch['prompt_tokens'],
        prompt_mask=batch['prompt_mask'], context=context,
        max_new_tokens=self.config.generation.max_new_tokens,
        stop_tokens=(self.tokenizer.eos_id,), pad_id=self.tokenizer.pad_id)['tokens']

  def capabilities(self):
    return capabilities.Capabilities(generator=capabilities.Generator(self.answer))

  def eval_data(self):
    data = self.config.data
    return capabilities.EvalData(data_dir=self.data_dir, image_size=data.image_size,
                                 tokenizer=self.tokenizer, num_image_tokens=data.num_image_tokens,
                                 prompt_len=data.prompt_len)

  def pretrained_params(self):
    """Top-level param subtrees from `config.init` workdirs, as numpy (`tasks.pretrained`)."""
    return pretrained.init_parts(self.config.init,
                                 None if self.text_only else self.config.model.vision)
