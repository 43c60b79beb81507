r"""Evaluation entry point: restore a checkpoint on the devices present and run its evaluators.

  python -m mmjax.evaluate --workdir /tmp/clip_small               # newest step, saved config
  python -m mmjax.evaluate --workdir /tmp/clip_small --step 250 \
      --config configs/clip.py:small --config.evals.zeroshot.templates=clip80
  python -m mmjax.evaluate --workdir /tmp/openai_clip --hf_dir /path/to/clip-vit-base-patch32 \
      --config configs/clip.py:base --config.data.tokenizer=clip_bpe   # imported weights

A checkpoint written on any mesh restores here: the config's mesh is used if it uses exactly
the devices present, otherwise all devices go to data parallelism. The config is checked as
`mmjax.train` checks it (`tasks.validate_config`) before anything is built. Metrics go to
`eval_metrics.jsonl`, `tensorboard/eval_metrics/` and `eval/metrics_<step>.json`; each
evaluator's report (zero-shot confusions, retrieval grids) and the training curves are
written as JSON / PNG into `eval/`.
"""

import json
import os

from absl import app
from absl import flags
from absl import logging
import flax.linen as nn
import jax
import ml_collections
from ml_collections import config_flags

from mmjax import checkpoint
from mmjax import distributed
from mmjax import files
from mmjax import metrics_writer
from mmjax import sharding
from mmjax import tasks
from mmjax import xla_flags


def evaluation_mesh(config, devices) -> jax.sharding.Mesh:
  """The config's mesh if it uses exactly `devices`, else a data-parallel mesh over all of them.

  The fallback is for a mesh made for another device count (`sharding.MeshSizeError`: a
  checkpoint trained on 8 devices evaluated on 1, or on 2 with 8 here), and says so; a
  malformed `config.mesh` (an unknown axis, a size of 0, two -1 axes) raises its ValueError.
  """
  try:
    return sharding.make_mesh(config.mesh, devices)
  except sharding.MeshSizeError as error:
    print(f'config.mesh {dict(config.mesh)} does not fit {len(devices)} devices ({error}); '
          f'evaluating data-parallel over all of them', flush=True)
    return sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)),
                              devices)


def validate_config(config, mesh: jax.sharding.Mesh) -> None:
  """`tasks.validate_config`, the checks `mmjax.train` runs, for evaluating `config` on `mesh`
  (the one `evaluation_mesh` chose): a ValueError naming the key of a setting that cannot
  work, before anything is built. The training batch is not checked against the mesh: no
  training batch is read here."""
  checked = config.copy_and_resolve_references()
  with checked.unlocked():
    checked.mesh = ml_collections.ConfigDict(dict(mesh.shape))
  tasks.validate_config(checked, mesh.size, training=False)


def abstract_params(task, mesh):
  """ShapeDtypeStructs of the task's parameters with their shardings on `mesh`."""
  boxed = jax.eval_shape(task.init, jax.random.PRNGKey(0))
  shardings = sharding.logical_shardings(boxed, mesh)
  sharding.check_divisible(boxed, shardings, 'params')
  return checkpoint.abstract_like(sharding.strip_boxes(boxed), shardings)


def evaluate(evaluators: dict, params) -> dict[str, float]:
  """Runs every evaluator; metrics are prefixed by the evaluator's name."""
  metrics = {}
  for name, evaluator in evaluators.items():
    metrics.update({f'{name}/{key}': value for key, value in evaluator.run(params).items()})
  return metrics


def write_reports(evaluators: dict, directory: str, step: int) -> list[str]:
  """Each evaluator's report files (those that have `write_report`), into `directory`."""
  os.makedirs(directory, exist_ok=True)
  paths = []
  for evaluator in evaluators.values():
    if hasattr(evaluator, 'write_report'):
      paths += evaluator.write_report(directory, step)
  return paths


def load_config(workdir: str, step: int | None, config=None):
  """`config` if given, else the config saved with the checkpoint at `step` (newest)."""
  if config is not None:
    return config
  reader = checkpoint.CheckpointReader(os.path.join(workdir, 'checkpoints'))
  try:
    step = reader.resolve_step(step)
    saved = reader.config(step)
    if saved is None:
      raise FileNotFoundError(f'checkpoint {step} in {workdir} was saved without its config; '
                              'pass --config')
    return ml_collections.ConfigDict(saved)
  finally:
    reader.close()


def restore_params(workdir: str, task, mesh, step: int | None = None):
  """`(step, params)` of `workdir`'s checkpoint at `step` (default newest), placed for `mesh`."""
  reader = checkpoint.CheckpointReader(os.path.join(workdir, 'checkpoints'))
  try:
    step = reader.resolve_step(step)
    return step, reader.params(step, abstract_params(task, mesh))
  finally:
    reader.close()


def run(workdir: str, *, config=None, step: int | None = None, devices=None, params=None):
  """Evaluates the checkpoint at `step` (default newest) of `workdir` on `devices`.

  params: evaluate these parameters instead of a checkpoint's (e.g. imported weights);
  they are placed on the mesh and reported as step 0 unless `step` is given.
  Returns `(step, metrics, report_paths)`.
  """
  devices = jax.devices() if devices is None else devices
  config = load_config(workdir, step, config) if params is None else config
  if config is None:
    raise ValueError('evaluating given params needs their config')
  mesh = evaluation_mesh(config, devices)
  validate_config(config, mesh)
  is_chief = distributed.is_chief()
  with sharding.activate(mesh):
    task = tasks.get_task(config)
    if params is None:
      step, params = restore_params(workdir, task, mesh, step)
    else:
      step = step or 0
      params = jax.tree.map(lambda x, t: jax.device_put(x, t.sharding), nn.unbox(params),
                            abstract_params(task, mesh))
    evaluators = task.evaluators(mesh)
    metrics = evaluate(evaluators, params)

  os.makedirs(workdir, exist_ok=True)
  report_dir = os.path.join(workdir, 'eval')
  paths = []
  if is_chief:
    writer = metrics_writer.MetricsWriter(workdir, name='eval_metrics')
    writer.write(step, metrics)
    writer.close()
    paths = write_reports(evaluators, report_dir, step)
    metrics_path = os.path.join(report_dir, f'metrics_{step}.json')
    with files.atomic_write(metrics_path) as f:
      json.dump({'step': step, 'mesh': dict(mesh.shape), **metrics}, f, indent=1)
    paths += [metrics_path] + metrics_writer.plot_curves(workdir)
  return step, metrics, paths


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  xla_flags.apply()  # before JAX starts a backend: malloc settings for XLA:CPU steps
  logging.set_verbosity(logging.WARNING)
  distributed.initialize(*(holder.value for holder in _DISTRIBUTED))
  config, params = _CONFIG.value, None
  if _HF_DIR.value:
    if config is None:
      raise app.UsageError('--hf_dir needs --config (the data, tokenizer and evaluators)')
    params = tasks.task_class(config).import_weights(config, _HF_DIR.value)
  step, metrics, paths = run(_WORKDIR.value, config=config, step=_STEP.value, params=params)
  if distributed.is_chief():
    print(f'evaluated step {step}:')
    for key, value in sorted(metrics.items()):
      print(f'  {key:48s} {value:.4f}' if isinstance(value, float) else f'  {key:48s} {value}')
    print('wrote ' + ', '.join(paths))


if __name__ == '__main__':
  # Defined here, not at import, so both entry points can be imported in one process.
  _CONFIG = config_flags.DEFINE_config_file(
      'config', None, 'Experiment config file[:variant]; default: the one saved with the '
      'checkpoint.')
  _WORKDIR = flags.DEFINE_string('workdir', None, 'Training run directory (with checkpoints/).')
  _STEP = flags.DEFINE_integer('step', None, 'Checkpoint step; default: the newest.')
  _DISTRIBUTED = distributed.define_flags()
  _HF_DIR = flags.DEFINE_string(
      'hf_dir', None, 'Evaluate public weights from this directory (the task\'s '
      '`import_weights`: CLIP / SigLIP read a Hugging Face save_pretrained directory) instead '
      'of a checkpoint (results go to --workdir).')
  flags.mark_flags_as_required(['workdir'])
  app.run(main)
