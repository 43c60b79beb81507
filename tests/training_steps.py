"""Helpers of the task tests: a few train steps of a config outside `train.run`."""

import jax
import numpy as np

from mmjax import sharding
from mmjax import train


def flat_params(params) -> dict[str, np.ndarray]:
  """{key path: numpy array} of a params tree (fetched from the devices)."""
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(params))}


def train_steps(config, steps: int, mesh_axes=None):
  """(initial params, params after `steps` steps, per-step metrics as float dicts), on one
  device or on all 8 (`mesh_axes`); pretrained parts loaded as `train.run` would."""
  devices = jax.devices() if mesh_axes else jax.devices()[:1]
  mesh = sharding.make_mesh(mesh_axes or dict(data=1), devices)
  with sharding.activate(mesh):
    trainer = train.Trainer(config, mesh)
    state = trainer.load_pretrained(trainer.init_state(jax.random.PRNGKey(0)))
    initial = flat_params(state['params'])
    data = trainer.task.train_iterator(process_index=0, process_count=1)
    keys = trainer.task.batch_spec(1)
    history = []
    for _ in range(steps):
      batch = next(data)
      state, metrics = trainer.train_step(
          state, sharding.global_batch({k: batch[k] for k in keys}, trainer.batch_sharding))
      history.append({k: float(v) for k, v in metrics.items()})
  return initial, flat_params(state['params']), history
