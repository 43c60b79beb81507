"""Loading experiment configs and rejecting impossible ones before anything compiles."""

import ast
import importlib.util
import numbers
import os

import ml_collections

from mmjax import sharding

DTYPES = ('float32', 'bfloat16')
# config.nonfinite: what a step with a non-finite loss, gradient or parameter does.
NONFINITE_POLICIES = ('stop', 'skip')
# Integer keys of every config (configs/common.py) that count something and must be >= 1:
# zero would divide by zero (grad_accum_steps, the `step % every` of the training loop) or
# keep no checkpoint, and would otherwise fail only after compiling.
POSITIVE_INTEGERS = ('batch_size', 'total_steps', 'grad_accum_steps', 'log_every',
                     'eval_every', 'checkpoint_every', 'keep_checkpoints')


def get_key(config, dotted_key: str):
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


def parse_overrides(items) -> dict:
  """`['model.cross_attn_every=1', 'data.repeat_prob=0.5']` -> {dotted key: value}, each value a
  Python literal where it parses as one (1, 0.5, True, (0, 1)), else the string."""
  overrides = {}
  for item in items:
    key, sep, value = item.partition('=')
    if not sep:
      raise ValueError(f'override {item!r} is not KEY=VALUE')
    try:
      overrides[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      overrides[key] = value
  return overrides


def changes(old: dict, new: dict, prefix: str = '') -> list[str]:
  """'key: old -> new' for each dotted key whose value differs between two config dicts (a
  key only one of them has shows as missing there), in key order."""
  lines = []
  for key in sorted(set(old) | set(new), key=str):
    a, b = old.get(key, '<missing>'), new.get(key, '<missing>')
    if isinstance(a, dict) and isinstance(b, dict):
      lines += changes(a, b, f'{prefix}{key}.')
    elif a != b and not (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple))
                         and list(a) == list(b)):
      lines.append(f'{prefix}{key}: {a!r} -> {b!r}')
  return lines


def data_dir(config) -> str:
  """`config.data.data_dir`, else `$MMJAX_DATA_DIR`, else `~/.cache/mmjax/datasets`."""
  return os.path.expanduser(
      config.data.data_dir or os.environ.get('MMJAX_DATA_DIR', '~/.cache/mmjax/datasets'))


def validate(config: ml_collections.ConfigDict, num_devices: int, *,
             training: bool = True) -> dict[str, int]:
  """Checks the settings every config has that would otherwise fail deep inside compilation
  or after it (a family's own keys: `mmjax.tasks.validate_config`, which calls this first).

  Args:
    config: the experiment config.
    num_devices: the devices `config.mesh` must use, all of them (`sharding.mesh_shape`).
    training: False skips the checks of the training batch against the mesh
      (`mmjax.evaluate` reads no training batch, and may evaluate on another mesh).

  Returns:
    The resolved mesh shape.

  Raises:
    ValueError: naming the config key to change.
  """
  for key in POSITIVE_INTEGERS:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
      raise ValueError(f'config.{key}={value!r} must be a positive integer')
  mesh = sharding.mesh_shape(config.mesh, num_devices)
  data_parallel = mesh['data'] * mesh['fsdp']
  if training:
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
  if config.adam.mu_dtype not in (None, *DTYPES):
    raise ValueError(f'config.adam.mu_dtype={config.adam.mu_dtype!r}; use None or one of '
                     f'{DTYPES}')
  if config.nonfinite not in NONFINITE_POLICIES:
    raise ValueError(f'config.nonfinite={config.nonfinite!r}; use one of {NONFINITE_POLICIES}')
  step = config.inject_nonfinite_at_step
  if step is not None and (isinstance(step, bool) or not isinstance(step, numbers.Integral)
                           or step < 1):
    raise ValueError(f'config.inject_nonfinite_at_step={step!r} must be None or a step >= 1')
  return mesh
