"""Loading experiment configs and rejecting impossible ones before anything compiles."""

import importlib.util
import os

import ml_collections

from mmjax import sharding
from mmjax.data import tokenizers
from mmjax.models import layers

DTYPES = ('float32', 'bfloat16')
LOSSES = ('softmax', 'sigmoid')
LOSS_IMPLS = ('gathered', 'ring')
PROJECTIONS = ('linear', 'linear_bias', 'none')


def _get(config, dotted_key: str):
  for part in dotted_key.split('.'):
    config = config[part]
  return config


def load(spec: str, overrides: dict | None = None) -> ml_collections.ConfigDict:
  """`'configs/clip.py:tiny'` plus `{'model.image.width': 64}` -> a locked ConfigDict.

  An override of a key the config does not have raises a KeyError naming the key.
  """
  path, _, arg = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location(
      'mmjax_config_' + os.path.basename(path).removesuffix('.py'), path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()
  for key, value in (overrides or {}).items():
    set_key(config, key, value)
  return config


def set_key(config: ml_collections.ConfigDict, dotted_key: str, value) -> None:
  """Sets `config.a.b.c = value`, raising a KeyError that names an unknown key."""
  *parents, leaf = dotted_key.split('.')
  node = config
  for depth, part in enumerate(parents + [leaf]):
    if part not in node:
      known = ', '.join(sorted(node.keys()))
      prefix = '.'.join(parents[:depth] + [part])
      raise KeyError(f'config has no key {prefix!r} (known here: {known})')
    if depth < len(parents):
      node = node[part]
  with config.unlocked():
    node[leaf] = value


def data_dir(config) -> str:
  """`config.data.data_dir`, else `$MMJAX_DATA_DIR`, else `~/.cache/mmjax/datasets`."""
  return os.path.expanduser(
      config.data.data_dir or os.environ.get('MMJAX_DATA_DIR', '~/.cache/mmjax/datasets'))


def validate(config: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
  """Checks settings that would otherwise fail deep inside compilation.

  Returns the resolved mesh shape. Each error names the config key to change.
  """
  mesh = sharding.mesh_shape(config.mesh, num_devices)
  data_parallel = mesh['data'] * mesh['fsdp']
  if config.batch_size % data_parallel:
    raise ValueError(
        f'config.batch_size={config.batch_size} is not divisible by the data-parallel size '
        f'{data_parallel} (config.mesh.data={mesh["data"]} x config.mesh.fsdp={mesh["fsdp"]})')
  if config.batch_size % config.grad_accum_steps:
    raise ValueError(f'config.batch_size={config.batch_size} is not divisible by '
                     f'config.grad_accum_steps={config.grad_accum_steps}')
  if (config.batch_size // config.grad_accum_steps) % data_parallel:
    raise ValueError(
        f'the micro-batch config.batch_size / config.grad_accum_steps = '
        f'{config.batch_size // config.grad_accum_steps} is not divisible by the '
        f'data-parallel size {data_parallel}')
  if config.compute_dtype not in DTYPES:
    raise ValueError(f'config.compute_dtype={config.compute_dtype!r}; use one of {DTYPES}')
  if config.get('task', 'clip') != 'clip':  # Other families check their own keys.
    from mmjax import tasks  # Here, not at the top: mmjax.tasks imports this module.
    if config.total_steps < 1:
      raise ValueError(f'config.total_steps={config.total_steps} must be positive')
    if config.adam.get('mu_dtype') not in (None, *DTYPES):
      raise ValueError(f'config.adam.mu_dtype={config.adam.mu_dtype!r}; use None or one of '
                       f'{DTYPES}')
    if config.task not in tasks.TASKS:
      raise ValueError(f'config.task={config.task!r} is unknown; known: {sorted(tasks.TASKS)}')
    tasks.TASKS[config.task].validate_config(config)
    return mesh
  if config.get('loss') is not None and config.loss not in LOSSES:
    raise ValueError(f'config.loss={config.loss!r}; use one of {LOSSES}')
  if config.get('loss_impl', 'gathered') not in LOSS_IMPLS:
    raise ValueError(f'config.loss_impl={config.loss_impl!r}; use one of {LOSS_IMPLS}')
  if config.loss == 'sigmoid' and config.model.bias_init is None:
    raise ValueError('config.loss=sigmoid needs config.model.bias_init (SigLIP uses -10)')
  if config.total_steps < 1:
    raise ValueError(f'config.total_steps={config.total_steps} must be positive')
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
    value = _get(config, key)
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
  if config.adam.get('mu_dtype') not in (None, *DTYPES):
    raise ValueError(f'config.adam.mu_dtype={config.adam.mu_dtype!r}; use None or one of '
                     f'{DTYPES}')
  if config.data.tokenizer not in tokenizers.VOCAB_SIZES:
    raise ValueError(f'config.data.tokenizer={config.data.tokenizer!r}; use one of '
                     f'{tokenizers.CHOICES}')
  vocab_size = tokenizers.VOCAB_SIZES[config.data.tokenizer]
  if text.vocab_size < vocab_size:
    raise ValueError(f'config.model.text.vocab_size={text.vocab_size} is smaller than the '
                     f'{config.data.tokenizer!r} tokenizer vocabulary ({vocab_size})')
  if config.data.max_text_len > text.context_length:
    raise ValueError(f'config.data.max_text_len={config.data.max_text_len} exceeds '
                     f'config.model.text.context_length={text.context_length}')
  return mesh
