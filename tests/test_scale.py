"""Scale-out knobs: remat policies, a bfloat16 first moment, depth under nn.scan, and the
collective accounting of experiments/bench_scale.py on real compiled programs."""

import functools
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import config_lib
from mmjax import sharding
from mmjax import tasks
from mmjax import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, 'configs', 'clip.py') + ':tiny'


@functools.cache
def _bench_scale():
  """experiments/bench_scale.py as a module (loaded once: it defines absl flags)."""
  spec = importlib.util.spec_from_file_location(
      'bench_scale', os.path.join(REPO, 'experiments', 'bench_scale.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope='module')
def data_dir(shared_data_dir):
  return shared_data_dir


def _loss_and_grads(config, mesh_axes=None):
  mesh = sharding.make_mesh(mesh_axes or dict(data=1), jax.devices()[:1] if not mesh_axes
                            else jax.devices())
  with sharding.activate(mesh):
    trainer = train.Trainer(config, mesh)
    state = trainer.init_state(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    batch = {'image': rng.uniform(-1, 1, (64, 8, 8, 3)).astype(np.float32),
             'text': rng.integers(1, 258, (64, 48)).astype(np.int32)}
    batch = sharding.global_batch(batch, trainer.batch_sharding)
    loss, _, grads = trainer.gradients(state['params'], batch, jax.random.PRNGKey(1))
  return float(loss), jax.device_get(grads)


@pytest.fixture(scope='module')
def tiny_loss_and_grads(data_dir):
  """`_loss_and_grads` of the tiny config as it is: what the variants below must equal."""
  return _loss_and_grads(config_lib.load(TINY, {'data.data_dir': data_dir}))


@pytest.mark.parametrize('policy', ['full', 'dots', 'dots_no_batch'])
@pytest.mark.slow
def test_remat_policies_change_nothing_but_memory(data_dir, tiny_loss_and_grads, policy):
  loss, grads = tiny_loss_and_grads
  remat_loss, remat_grads = _loss_and_grads(
      config_lib.load(TINY, {'data.data_dir': data_dir, 'model.remat': policy}))
  assert remat_loss == pytest.approx(loss, rel=1e-6)
  for got, want in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(grads)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_unrolled_layer_loop_changes_nothing(data_dir, tiny_loss_and_grads):
  """`scan_unroll` changes the compiled program, not the model."""
  loss, grads = tiny_loss_and_grads
  other_loss, other_grads = _loss_and_grads(
      config_lib.load(TINY, {'data.data_dir': data_dir, 'model.scan_unroll': False}))
  assert other_loss == pytest.approx(loss, rel=1e-6)
  scale = max(np.abs(g).max() for g in jax.tree.leaves(grads))  # float32 rounding
  for got, want in zip(jax.tree.leaves(other_grads), jax.tree.leaves(grads)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * scale)


def test_unknown_remat_policy_is_named(data_dir):
  config = config_lib.load(TINY, {'data.data_dir': data_dir, 'model.remat': 'dotz'})
  with pytest.raises(ValueError, match="config.model.remat='dotz'"):
    tasks.validate_config(config, 1)


def test_bfloat16_first_moment(data_dir):
  config = config_lib.load(TINY, {'data.data_dir': data_dir, 'adam.mu_dtype': 'bfloat16'})
  mesh = sharding.make_mesh(dict(data=1), jax.devices()[:1])
  with sharding.activate(mesh):
    trainer = train.Trainer(config, mesh)
    state = trainer.init_state(jax.random.PRNGKey(0))
  adam = state['opt_state'][1][0]
  assert {x.dtype for x in jax.tree.leaves(adam.mu)} == {jnp.dtype(jnp.bfloat16)}
  assert {x.dtype for x in jax.tree.leaves(adam.nu)} == {jnp.dtype(jnp.float32)}
  assert {x.dtype for x in jax.tree.leaves(state['params'])} == {jnp.dtype(jnp.float32)}
  # The state (arguments of the step) shrinks by half the first moment's float32 bytes.
  full = train.Trainer(config_lib.load(TINY, {'data.data_dir': data_dir}), mesh)
  state_bytes = lambda t: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(
      t.abstract_state))
  param_bytes = sum(x.size * 4 for x in jax.tree.leaves(full.abstract_state['params']))
  assert state_bytes(full) - state_bytes(trainer) == param_bytes // 2


@pytest.mark.slow
def test_scan_keeps_the_program_flat_in_depth(data_dir):
  """With nn.scan (not unrolled) the compiled step holds one block however deep the towers
  are."""
  bench = _bench_scale()
  mesh = sharding.make_mesh(dict(data=1), jax.devices()[:1])
  sizes = {}
  for depth in (2, 12):
    config = config_lib.load(TINY, {'data.data_dir': data_dir, 'model.image.depth': depth,
                                    'model.text.depth': depth, 'model.scan_unroll': False})
    _, compiled, _ = bench.compile_step(config, mesh)
    sizes[depth] = len(compiled.as_text().split('\n'))
  assert sizes[12] < 1.05 * sizes[2], sizes


@pytest.mark.parametrize('mesh_axes', [dict(data=8), dict(fsdp=8), dict(data=2, fsdp=4)])
@pytest.mark.slow
def test_collective_accounting_on_compiled_steps(data_dir, mesh_axes):
  """Parameter/gradient traffic the compiled step moves is at least the theoretical
  minimum for its strategy and, on these CPU programs, at most twice it."""
  bench = _bench_scale()
  config = config_lib.load(TINY, {'data.data_dir': data_dir, 'mesh.data': 1,
                                  **{f'mesh.{k}': v for k, v in mesh_axes.items()}})
  mesh = sharding.make_mesh(config.mesh, jax.devices())
  trainer, compiled, _ = bench.compile_step(config, mesh)
  traffic = bench.collective_traffic(compiled.as_text(), 8)
  param_bytes = sum(x.size * 4 for x in jax.tree.leaves(trainer.abstract_state['params']))
  minimum = bench.theoretical_bytes(param_bytes, dict(mesh.shape))
  total = sum(t['bytes'] for t in traffic.values())
  assert minimum <= total <= 2 * minimum, (traffic, minimum)
  if mesh_axes.get('fsdp', 1) > 1:
    # The scanned blocks' weights are gathered inside the loop: once per layer per pass.
    assert traffic['all-gather']['count'] >= 2 * config.model.image.depth
