"""Ring losses (shard_map + ppermute) against the gathered GSPMD losses: value, gradients,
and a training step."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import config_lib
from mmjax import losses
from mmjax import ring_losses
from mmjax import sharding
from mmjax import tasks
from mmjax import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = [None, dict(data=8), dict(data=2, fsdp=4), dict(data=4, tensor=2)]


def _unit_rows(rng, batch, dim):
  x = rng.normal(size=(batch, dim))
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _mesh(mesh_axes):
  if mesh_axes is None:
    return sharding.make_mesh(dict(data=1), jax.devices()[:1])
  return sharding.make_mesh(mesh_axes)


def _embeddings(seed=0, batch=64, dim=32):
  rng = np.random.default_rng(seed)
  image, text = _unit_rows(rng, batch, dim), _unit_rows(rng, batch, dim)
  # Half the pairs correlated, so positives matter and the losses are far from log(batch).
  text[:batch // 2] = image[:batch // 2] + 0.3 * text[:batch // 2]
  text /= np.linalg.norm(text, axis=1, keepdims=True)
  return image, text


def _assert_close(got, want, what):
  (got_value, got_grads), (want_value, want_grads) = got, want
  np.testing.assert_allclose(got_value, want_value, rtol=2e-6, err_msg=what)
  # Float32 tolerance relative to the largest element: at scale 100 both implementations
  # are ~2e-6 from a float64 reference on gradients of size ~1 (cancellations in sums).
  for name, g, w in zip(('image', 'text', 'scale', 'bias'), got_grads, want_grads):
    g, w = np.asarray(g), np.asarray(w)
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * np.abs(w).max(),
                               err_msg=f'{what}: d/d{name}')


@pytest.mark.parametrize('mesh_axes', MESHES)
@pytest.mark.parametrize('scale,bias', [(10.0, -10.0), (14.3, -3.0), (100.0, -5.0)])
def test_ring_losses_match_gathered(mesh_axes, scale, bias):
  image, text = _embeddings()
  mesh = _mesh(mesh_axes)
  with sharding.activate(mesh):
    put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh))
    args = (put(image), put(text), jnp.float32(scale), jnp.float32(bias))
    if mesh_axes is not None:
      assert len(args[0].sharding.device_set) == 8
    grad = lambda fn, n: jax.jit(jax.value_and_grad(fn, argnums=tuple(range(n))))
    for name, n in (('sigmoid', 4), ('softmax', 3)):
      want = grad(getattr(losses, f'{name}_contrastive_loss'), n)(*args[:n])
      got = grad(getattr(ring_losses, f'{name}_contrastive_loss'), n)(*args[:n])
      assert got[1][0].sharding.is_equivalent_to(args[0].sharding, 2)
      _assert_close(got, want, f'{name} on {mesh_axes}')


def test_explicit_mesh_and_no_mesh():
  """The mesh can be passed instead of set; with no mesh at all the batch is one block."""
  image, text = _embeddings(seed=1)
  want = losses.softmax_contrastive_loss(image, text, 20.0)
  mesh = _mesh(dict(data=2, fsdp=4))
  put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh))
  got = ring_losses.softmax_contrastive_loss(put(image), put(text), 20.0, mesh=mesh)
  np.testing.assert_allclose(got, want, rtol=2e-6)
  got = ring_losses.softmax_contrastive_loss(image, text, 20.0)
  np.testing.assert_allclose(got, want, rtol=2e-6)
  want = losses.sigmoid_contrastive_loss(image, text, 10.0, -10.0)
  got = ring_losses.sigmoid_contrastive_loss(put(image), put(text), 10.0, -10.0, mesh=mesh)
  np.testing.assert_allclose(got, want, rtol=2e-6)


def test_no_global_logits_in_the_compiled_loss():
  """No [B, B] (nor [B/n, B]) array appears in the compiled loss and gradient."""
  batch, n = 256, 8
  image, text = _embeddings(batch=batch, dim=16)
  mesh = _mesh(dict(data=n))
  with sharding.activate(mesh):
    put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh))
    fn = jax.jit(jax.value_and_grad(ring_losses.sigmoid_contrastive_loss, argnums=(0, 1, 2, 3)))
    hlo = fn.lower(put(image), put(text), 10.0, -10.0).compile().as_text()
  assert f'f32[{batch // n},{batch // n}]' in hlo
  assert f'{batch},{batch}]' not in hlo and f'{batch // n},{batch}]' not in hlo


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('datasets'))


@pytest.mark.parametrize('config_name', ['clip.py', 'siglip.py'])
@pytest.mark.slow
def test_training_with_ring_loss_matches_gathered(data_dir, config_name):
  """2 steps of `Trainer.train_step` (loss, grads, AdamW) on data=2, fsdp=2, tensor=2."""
  spec = os.path.join(REPO, 'configs', config_name) + ':tiny'
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  results = {}
  for impl in ('gathered', 'ring'):
    config = config_lib.load(spec, {'data.data_dir': data_dir, 'loss_impl': impl})
    tasks.validate_config(config, jax.device_count())
    with sharding.activate(mesh):
      trainer = train.Trainer(config, mesh)
      data = trainer.task.train_iterator(process_index=0, process_count=1)
      keys = trainer.task.batch_spec(1)
      state = trainer.init_state(jax.random.PRNGKey(0))
      step_losses = []
      for _ in range(2):
        batch = next(data)
        batch = sharding.global_batch({key: batch[key] for key in keys}, trainer.batch_sharding)
        state, metrics = trainer.train_step(state, batch)
        step_losses.append(float(metrics['loss']))
    results[impl] = step_losses, jax.device_get(state['params'])
  (ring_losses_, ring_params), (want_losses, want_params) = results['ring'], results['gathered']
  np.testing.assert_allclose(ring_losses_, want_losses, rtol=1e-5)
  scale = max(np.abs(p).max() for p in jax.tree.leaves(want_params))
  for got, want in zip(jax.tree.leaves(ring_params), jax.tree.leaves(want_params)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale)


def test_bad_loss_impl_is_named(tmp_path):
  config = config_lib.load(os.path.join(REPO, 'configs', 'clip.py') + ':tiny',
                           {'data.data_dir': str(tmp_path), 'loss_impl': 'ringg'})
  with pytest.raises(ValueError, match=r"config.loss_impl='ringg'"):
    tasks.validate_config(config, jax.device_count())
