"""`config.trainable`: frozen params get no update, no optimizer state, and resume exactly."""

import os
import re

import flax
import jax
import numpy as np
import optax
import pytest

from mmjax import config_lib
from mmjax import sharding
from mmjax import tasks
from mmjax import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, 'configs', 'clip.py') + ':tiny'
TEXT_ONLY = 'text_tower/.*|text_projection/kernel'


@pytest.fixture(scope='module')
def data_dir(shared_data_dir):
  return shared_data_dir


def tiny_config(data_dir, trainable, **overrides):
  config = config_lib.load(TINY, {'data.data_dir': data_dir, **overrides})
  with config.unlocked():
    config.trainable = trainable
  return config


def _flat(params):
  return flax.traverse_util.flatten_dict(jax.device_get(params), sep='/')


@pytest.mark.slow
def test_only_matching_params_train(data_dir):
  """Frozen params stay bitwise equal; the rest follow AdamW run on the trainable ones alone."""
  config = tiny_config(data_dir, TEXT_ONLY)
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  with sharding.activate(mesh):
    trainer = train.Trainer(config, mesh)
    data = trainer.task.train_iterator(process_index=0, process_count=1)
    batches = [{key: value for key, value in next(data).items() if key != 'example_id'}
               for _ in range(3)]
    state = trainer.init_state(jax.random.PRNGKey(0))
    initial = _flat(state['params'])
    grad_norms = []
    for batch in batches:
      state, metrics = trainer.train_step(state, sharding.global_batch(
          batch, trainer.batch_sharding))
      grad_norms.append(float(metrics['grad_norm']))
  trained = _flat(state['params'])

  frozen = {path for path in initial if not re.fullmatch(TEXT_ONLY, path)}
  assert frozen and len(frozen) < len(initial)
  for path in frozen:
    np.testing.assert_array_equal(trained[path], initial[path], err_msg=path)

  # Reference: the unfrozen optimizer on the trainable params only, the others held fixed.
  fixed = {path: value for path, value in initial.items() if path in frozen}
  reference = {path: value for path, value in initial.items() if path not in frozen}
  optimizer = train.make_optimizer(tiny_config(data_dir, None))
  opt_state = optimizer.init(reference)

  def loss(trainable, batch):
    params = flax.traverse_util.unflatten_dict({**fixed, **trainable}, sep='/')
    return trainer.task.loss(params, batch, None)[0]

  reference_grads = jax.jit(jax.grad(loss))
  reference_norms = []
  for batch in batches:
    grads = reference_grads(reference, batch)
    reference_norms.append(float(optax.tree.norm(grads)))
    updates, opt_state = optimizer.update(grads, opt_state, reference)
    reference = optax.apply_updates(reference, updates)
  np.testing.assert_allclose(grad_norms, reference_norms, rtol=1e-5)
  for path, value in reference.items():
    assert not np.array_equal(trained[path], initial[path]), path
    np.testing.assert_allclose(trained[path], value, rtol=1e-5, atol=1e-6, err_msg=path)


def _state_size(config, mesh):
  with sharding.activate(mesh):
    abstract = train.Trainer(config, mesh).abstract_state
  count = lambda tree: sum(leaf.size for leaf in jax.tree.leaves(tree))
  return count(abstract['params']), count(abstract['opt_state'])


def test_frozen_params_have_no_optimizer_state(data_dir):
  mesh = sharding.make_mesh(dict(data=2, fsdp=4))
  params_size, full_size = _state_size(tiny_config(data_dir, None), mesh)
  _, frozen_size = _state_size(tiny_config(data_dir, TEXT_ONLY), mesh)
  initial = _flat(jax.eval_shape(
      tasks.get_task(tiny_config(data_dir, None)).init, jax.random.PRNGKey(0)))
  trainable_size = sum(leaf.value.size for path, leaf in initial.items()
                       if re.fullmatch(TEXT_ONLY, path))
  scalars = full_size - 2 * params_size  # step counts: the same with or without freezing
  assert frozen_size == 2 * trainable_size + scalars < full_size


@pytest.mark.parametrize('pattern,message', [
    ('text_tower', r"config.trainable='text_tower' matches no parameter"),
    ('(projector', r"config.trainable='\(projector' is not a regular expression"),
])
def test_bad_pattern_names_the_key(data_dir, pattern, message):
  mesh = sharding.make_mesh(dict(data=8))
  with sharding.activate(mesh), pytest.raises(ValueError, match=message):
    train.Trainer(tiny_config(data_dir, pattern), mesh)


@pytest.mark.slow
def test_resume_with_frozen_params_is_exact(data_dir, tmp_path):
  steps = 6
  config = tiny_config(data_dir, TEXT_ONLY, total_steps=steps, eval_every=1000,
                       checkpoint_every=3, evals={}, **{'mesh.data': 2, 'mesh.fsdp': 4})
  straight, _ = train.run(config, str(tmp_path / 'straight'))
  train.run(config, str(tmp_path / 'resumed'), stop_at_step=steps // 2)
  resumed, _ = train.run(config, str(tmp_path / 'resumed'))
  assert jax.tree.structure(resumed) == jax.tree.structure(straight)
  for got, want in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
