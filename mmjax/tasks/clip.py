"""CLIP / SigLIP task: contrastive image-text training, zero-shot evaluation."""

import functools

import jax
import jax.numpy as jnp

from mmjax import config_lib
from mmjax import losses
from mmjax import ring_losses
from mmjax.convert import hf_directory
from mmjax.data import pipeline
from mmjax.data import tokenizers
from mmjax.evals import capabilities
from mmjax.models import layers
from mmjax.models.clip import CLIP
from mmjax.tasks.base import Task

LOSSES = ('softmax', 'sigmoid')
LOSS_IMPLS = ('gathered', 'ring')
PROJECTIONS = ('linear', 'linear_bias', 'none')


def build_model(config) -> CLIP:
  """The dual encoder described by `config.model` (compute in `config.compute_dtype`)."""
  model_config = config.model
  tower_options = dict(scan=model_config.scan, scan_unroll=model_config.scan_unroll,
                       remat=model_config.remat)
  return CLIP(
      image=dict(model_config.image, **tower_options),
      text=dict(model_config.text, **tower_options),
      embed_dim=model_config.embed_dim,
      temperature_init=model_config.temperature_init,
      max_logit_scale=model_config.max_logit_scale,
      bias_init=model_config.bias_init,
      image_projection_kind=model_config.image_projection,
      text_projection_kind=model_config.text_projection,
      dtype=jnp.dtype(config.compute_dtype))


def set_model_config(config, model_kwargs: dict) -> None:
  """Writes `CLIP(...)` kwargs (e.g. from `mmjax.convert`) into `config.model`: the inverse
  of `build_model`, so a task can be built around imported weights."""
  renamed = {'image_projection_kind': 'image_projection',
             'text_projection_kind': 'text_projection'}
  with config.unlocked():
    for key, value in model_kwargs.items():
      if key in ('image', 'text'):
        tower = dict(value)
        config.model.scan = tower.pop('scan', config.model.scan)
        config.model[key].update(tower)
      else:
        config.model[renamed.get(key, key)] = value


class ClipTask(Task):
  """Images and captions -> softmax (CLIP) or sigmoid (SigLIP) contrastive loss."""

  def __init__(self, config):
    super().__init__(config)
    self.model = build_model(config)
    self.data_dir = config_lib.data_dir(config)

  @functools.cached_property
  def tokenizer(self):
    """`config.data.tokenizer`, loaded on first use (the BPE vocabulary is a file)."""
    return tokenizers.get(self.config.data.tokenizer)

  @classmethod
  def validate_config(cls, config):
    if config.data.name not in pipeline.DATASETS:
      raise ValueError(f'config.data.name={config.data.name!r} is not a dataset; use one of '
                       f'{pipeline.DATASETS}')
    if config.loss not in LOSSES:
      raise ValueError(f'config.loss={config.loss!r}; use one of {LOSSES}')
    if config.loss_impl not in LOSS_IMPLS:
      raise ValueError(f'config.loss_impl={config.loss_impl!r}; use one of {LOSS_IMPLS}')
    if config.loss == 'sigmoid' and config.model.bias_init is None:
      raise ValueError('config.loss=sigmoid needs config.model.bias_init (SigLIP uses -10)')
    image, text = config.model.image, config.model.text
    if config.data.image_size % image.patch_size:
      raise ValueError(f'config.data.image_size={config.data.image_size} is not divisible by '
                       f'config.model.image.patch_size={image.patch_size}')
    for tower_name, tower in (('image', image), ('text', text)):
      if tower.width % tower.num_heads:
        raise ValueError(f'config.model.{tower_name}.width={tower.width} is not divisible by '
                         f'config.model.{tower_name}.num_heads={tower.num_heads}')
    choices = {'model.image.pool': ('cls', 'map'), 'model.text.pool': ('eot', 'last'),
               'model.image_projection': PROJECTIONS, 'model.text_projection': PROJECTIONS}
    for key, allowed in choices.items():
      value = config_lib.get_key(config, key)
      if value not in allowed:
        raise ValueError(f'config.{key}={value!r}; use one of {allowed}')
    if image.pool == 'cls' and not image.class_token:
      raise ValueError("config.model.image.pool='cls' needs config.model.image.class_token=True")
    for tower_name, tower in (('image', image), ('text', text)):
      projection = config.model[f'{tower_name}_projection']
      if projection == 'none' and tower.width != config.model.embed_dim:
        raise ValueError(
            f"config.model.{tower_name}_projection='none' needs config.model.{tower_name}.width "
            f'({tower.width}) == config.model.embed_dim ({config.model.embed_dim})')
    if config.model.remat not in (*layers.REMAT_POLICIES, True, False):
      raise ValueError(f'config.model.remat={config.model.remat!r}; use one of '
                       f'{tuple(layers.REMAT_POLICIES)}')
    if config.data.tokenizer not in tokenizers.TOKENIZERS:
      raise ValueError(f'config.data.tokenizer={config.data.tokenizer!r}; use one of '
                       f'{tuple(tokenizers.TOKENIZERS)}')
    vocab_size = tokenizers.TOKENIZERS[config.data.tokenizer].vocab_size
    if text.vocab_size < vocab_size:
      raise ValueError(f'config.model.text.vocab_size={text.vocab_size} is smaller than the '
                       f'{config.data.tokenizer!r} tokenizer vocabulary ({vocab_size})')
    if config.data.max_text_len > text.context_length:
      raise ValueError(f'config.data.max_text_len={config.data.max_text_len} exceeds '
                       f'config.model.text.context_length={text.context_length}')

  def init(self, rng):
    spec = self.batch_spec(1)
    dummy = {key: jnp.zeros(value.shape, value.dtype) for key, value in spec.items()}
    return self.model.init(rng, dummy['image'], dummy['text'])['params']

  def batch_spec(self, batch_size):
    size, length = self.config.data.image_size, self.config.data.max_text_len
    return {
        'image': jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.float32),
        'text': jax.ShapeDtypeStruct((batch_size, length), jnp.int32),
    }

  def loss(self, params, batch, rng):
    del rng  # no dropout in these towers
    image_embeddings, text_embeddings, logit_scale, logit_bias = self.model.apply(
        {'params': params}, batch['image'], batch['text'])
    # 'ring' (mmjax/ring_losses.py): same loss and gradients, no [B, B] logits; it runs on
    # the mesh set by `sharding.activate`.
    impl = ring_losses if self.config.loss_impl == 'ring' else losses
    if self.config.loss == 'sigmoid':
      loss = impl.sigmoid_contrastive_loss(
          image_embeddings, text_embeddings, logit_scale, logit_bias)
      return loss, {'logit_scale': logit_scale, 'logit_bias': logit_bias}
    loss = impl.softmax_contrastive_loss(image_embeddings, text_embeddings, logit_scale)
    return loss, {'logit_scale': logit_scale}

  def train_iterator(self, *, process_index, process_count):
    data = self.config.data
    pipeline.build(data.name, self.data_dir)
    return pipeline.train_iterator(
        data.name, self.data_dir, tokenizer=self.tokenizer, image_size=data.image_size,
        max_text_len=data.max_text_len, global_batch_size=self.config.batch_size,
        seed=self.config.seed, process_index=process_index, process_count=process_count,
        worker_count=data.worker_count, augment=data.augment)

  def train_data_identity(self):
    name = self.config.data.name
    return {name: pipeline.dataset_identity(name, self.data_dir)}

  def encode_image(self, params, images):
    """`[b, h, w, 3]` in [-1, 1] -> unit-norm image embeddings `[b, embed_dim]`."""
    return self.model.apply({'params': params}, images, method=self.model.encode_image)

  def encode_text(self, params, token_ids):
    """`[b, l]` token ids -> unit-norm text embeddings `[b, embed_dim]`."""
    return self.model.apply({'params': params}, token_ids, method=self.model.encode_text)

  def tokenize(self, texts):
    """`texts` (list of str) -> int32 `[n, config.data.max_text_len]` token ids."""
    return self.tokenizer.encode(texts, self.config.data.max_text_len)

  def capabilities(self):
    return capabilities.Capabilities(dual_encoder=capabilities.DualEncoder(
        encode_image=self.encode_image, encode_text=self.encode_text, tokenize=self.tokenize))

  def eval_data(self):
    return capabilities.EvalData(data_dir=self.data_dir, image_size=self.config.data.image_size,
                                 dataset=self.config.data.name)

  @classmethod
  def import_weights(cls, config, path):
    """Hugging Face `CLIPModel` / `SiglipModel` weights from a `save_pretrained` directory;
    `config.model` is rewritten to their architecture (`set_model_config`)."""
    model_kwargs, params = hf_directory.load_hf_directory(path)
    set_model_config(config, model_kwargs)
    return params
