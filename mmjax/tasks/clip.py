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
from mmjax.models import clip as clip_model
from mmjax.models import layers
from mmjax.models import resnet
from mmjax.models.clip import CLIP
from mmjax.tasks.base import Task

LOSSES = ('softmax', 'sigmoid')
LOSS_IMPLS = ('gathered', 'ring')
PROJECTIONS = ('linear', 'linear_bias', 'none')
IMAGE_KINDS = ('vit', 'resnet')


def image_kind(config) -> str:
  """`config.model.image.kind`: 'vit' or 'resnet'."""
  return config.model.image.kind


def image_tower_kwargs(config) -> dict:
  """`CLIP(image=...)` for `config.model.image`: its `kind` and that tower's kwargs.

  `config.model.image` is one flat schema for both kinds: 'vit' reads the unprefixed keys
  (`ViT` kwargs, plus `config.model.scan`, `scan_unroll`, `remat`); 'resnet' reads the
  `resnet_*` keys (`ModifiedResNet` kwargs without the prefix, `resnet_batch_norm_momentum`
  excepted: the task's) and takes `output_dim=config.model.embed_dim` (open_clip's RN layout),
  `image_size=config.data.image_size` and `remat=config.model.remat`.
  """
  model_config, image = config.model, config.model.image
  if image_kind(config) == 'resnet':
    return dict(kind='resnet', layers=tuple(image.resnet_layers), width=image.resnet_width,
                heads=image.resnet_heads, output_dim=model_config.embed_dim,
                image_size=config.data.image_size, norm=image.resnet_norm,
                norm_groups=image.resnet_norm_groups, remat=model_config.remat)
  vit = {key: value for key, value in image.items()
         if key != 'kind' and not key.startswith('resnet_')}
  return dict(vit, kind='vit', scan=model_config.scan,
              scan_unroll=model_config.scan_unroll, remat=model_config.remat)


def build_model(config) -> CLIP:
  """The dual encoder described by `config.model` (compute in `config.compute_dtype`)."""
  model_config = config.model
  tower_options = dict(scan=model_config.scan, scan_unroll=model_config.scan_unroll,
                       remat=model_config.remat)
  return CLIP(
      image=image_tower_kwargs(config),
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
        if key == 'image':
          tower.setdefault('kind', 'vit')  # the converters' towers are ViTs
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
    # A BatchNorm ResNet trains with batch moments; `update_params` folds them into its
    # running statistics (`mmjax.models.resnet`).
    self.batch_norm = (image_kind(config) == 'resnet'
                       and config.model.image.resnet_norm == 'batch')

  @functools.cached_property
  def tokenizer(self):
    """`config.data.tokenizer`, loaded on first use (the BPE vocabulary is a file)."""
    return tokenizers.get(self.config.data.tokenizer)

  @classmethod
  def validate_config(cls, config):
    if config.data.name not in pipeline.DATASETS:
      raise ValueError(f'config.data.name={config.data.name!r} is not a dataset; use one of '
                       f'{pipeline.DATASETS}')
    if not 0 <= config.data.restyle_prob <= 1:
      raise ValueError(f'config.data.restyle_prob={config.data.restyle_prob} must be in [0, 1]')
    if config.loss not in LOSSES:
      raise ValueError(f'config.loss={config.loss!r}; use one of {LOSSES}')
    if config.loss_impl not in LOSS_IMPLS:
      raise ValueError(f'config.loss_impl={config.loss_impl!r}; use one of {LOSS_IMPLS}')
    if config.loss == 'sigmoid' and config.model.bias_init is None:
      raise ValueError('config.loss=sigmoid needs config.model.bias_init (SigLIP uses -10)')
    image, text = config.model.image, config.model.text
    kind = image_kind(config)
    if kind not in IMAGE_KINDS:
      raise ValueError(f'config.model.image.kind={kind!r}; use one of {IMAGE_KINDS}')
    # A ResNet has keys of its own (`_validate_resnet`) and its pool projects to embed_dim
    # itself (`image_tower_kwargs`): the checks of width, heads, pool and projection that
    # follow are the ViT's and the text tower's.
    vit = kind == 'vit'
    towers = (('image', image), ('text', text)) if vit else (('text', text),)
    if vit and config.data.image_size % image.patch_size:
      raise ValueError(f'config.data.image_size={config.data.image_size} is not divisible by '
                       f'config.model.image.patch_size={image.patch_size}')
    if not vit:
      cls._validate_resnet(config)
    for tower_name, tower in towers:
      if tower.width % tower.num_heads:
        raise ValueError(f'config.model.{tower_name}.width={tower.width} is not divisible by '
                         f'config.model.{tower_name}.num_heads={tower.num_heads}')
    choices = {**({'model.image.pool': ('cls', 'map'), 'model.image.stem': ('patch', 'conv')}
                  if vit else {}),
               'model.text.pool': clip_model.POOLS, 'model.image_projection': PROJECTIONS,
               'model.text_projection': PROJECTIONS}
    for key, allowed in choices.items():
      value = config_lib.get_key(config, key)
      if value not in allowed:
        raise ValueError(f'config.{key}={value!r}; use one of {allowed}')
    if vit and image.pool == 'cls' and not image.class_token:
      raise ValueError("config.model.image.pool='cls' needs config.model.image.class_token=True")
    for tower_name, tower in towers:
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

  @staticmethod
  def _validate_resnet(config):
    """The `config.model.image.resnet_*` keys and the image size of `kind='resnet'`."""
    image, prefix = config.model.image, 'config.model.image.resnet'
    blocks = image.resnet_layers
    if (not isinstance(blocks, (tuple, list)) or len(blocks) != 4
        or not all(isinstance(n, int) and n >= 1 for n in blocks)):
      raise ValueError(f'{prefix}_layers={blocks!r} must be 4 positive block counts, one per '
                       'stage (RN50: (3, 4, 6, 3))')
    if image.resnet_width < 2 or image.resnet_width % 2:
      raise ValueError(f'{prefix}_width={image.resnet_width} must be even and positive (the '
                       'stem starts with half of it)')
    features = 32 * image.resnet_width
    if image.resnet_heads < 1 or features % image.resnet_heads:
      raise ValueError(f'{prefix}_heads={image.resnet_heads} must divide the feature width '
                       f'32 * {prefix}_width = {features}')
    if image.resnet_norm not in resnet.NORMS:
      raise ValueError(f'{prefix}_norm={image.resnet_norm!r}; use one of {resnet.NORMS}')
    if image.resnet_norm == 'group' and (image.resnet_norm_groups < 1
                                         or (image.resnet_width // 2) % image.resnet_norm_groups):
      raise ValueError(f'{prefix}_norm_groups={image.resnet_norm_groups} must divide the '
                       f'stem width {prefix}_width / 2 = {image.resnet_width // 2}')
    if not 0 < image.resnet_batch_norm_momentum <= 1:
      raise ValueError(f'{prefix}_batch_norm_momentum={image.resnet_batch_norm_momentum} must '
                       'be in (0, 1]')
    if config.data.image_size % 32:
      raise ValueError(f'config.data.image_size={config.data.image_size} is not a multiple of '
                       "32, which config.model.image.kind='resnet' needs (it downsamples 32x)")

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
    outputs = self.model.apply({'params': params}, batch['image'], batch['text'], train=True,
                               mutable=['batch_stats'] if self.batch_norm else False)
    extra = {}
    if self.batch_norm:  # this batch's BatchNorm moments, for `update_params`
      outputs, state = outputs
      extra['batch_stats'] = state['batch_stats']
    image_embeddings, text_embeddings, logit_scale, logit_bias = outputs
    # 'ring' (mmjax/ring_losses.py): same loss and gradients, no [B, B] logits; it runs on
    # the mesh set by `sharding.activate`.
    impl = ring_losses if self.config.loss_impl == 'ring' else losses
    if self.config.loss == 'sigmoid':
      loss = impl.sigmoid_contrastive_loss(
          image_embeddings, text_embeddings, logit_scale, logit_bias)
      return loss, {'logit_scale': logit_scale, 'logit_bias': logit_bias, **extra}
    loss = impl.softmax_contrastive_loss(image_embeddings, text_embeddings, logit_scale)
    return loss, {'logit_scale': logit_scale, **extra}

  def update_params(self, params, aux, trainable):
    """Folds the loss's BatchNorm moments (`aux['batch_stats']`, a BatchNorm ResNet image
    tower only) into the running statistics (`resnet.update_batch_stats`); frozen ones
    (`trainable`) stay as they are."""
    aux = dict(aux)
    batch_stats = aux.pop('batch_stats', None)
    if batch_stats is not None:
      params = resnet.update_batch_stats(
          params, batch_stats, self.config.model.image.resnet_batch_norm_momentum, trainable)
    return params, aux

  def train_iterator(self, *, process_index, process_count):
    data = self.config.data
    pipeline.build(data.name, self.data_dir)
    return pipeline.train_iterator(
        data.name, self.data_dir, tokenizer=self.tokenizer, image_size=data.image_size,
        max_text_len=data.max_text_len, global_batch_size=self.config.batch_size,
        seed=self.config.seed, process_index=process_index, process_count=process_count,
        worker_count=data.worker_count, augment=data.augment, restyle_prob=data.restyle_prob)

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
