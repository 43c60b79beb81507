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


@pytest.mark.parametrize('kind', ['sigmoid', 'softmax'])
@pytest.mark.parametrize('mesh_from', ['activate', 'inputs'])
def test_no_global_logits_in_the_compiled_loss(kind, mesh_from):
  """No [B, B] (nor [B/n, B]) array and no all-gather of the batch in the compiled loss and
  gradient, whether the mesh is set (`sharding.activate`) or only the inputs' sharding has
  it (traced outside `activate`)."""
  batch, n, dim = 256, 8, 16
  image, text = _embeddings(batch=batch, dim=dim)
  mesh = _mesh(dict(data=n))
  put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh))
  args = (put(image), put(text), 10.0, -10.0)[:4 if kind == 'sigmoid' else 3]
  fn = jax.jit(jax.value_and_grad(getattr(ring_losses, f'{kind}_contrastive_loss'),
                                  argnums=tuple(range(len(args)))))
  if mesh_from == 'activate':
    with sharding.activate(mesh):
      hlo = fn.lower(*args).compile().as_text()
  else:
    hlo = fn.lower(*args).compile().as_text()
  assert f'f32[{batch // n},{batch // n}]' in hlo
  assert 'collective-permute(' in hlo
  assert f'{batch},{batch}]' not in hlo and f'{batch // n},{batch}]' not in hlo
  gathers = [line for line in hlo.splitlines() if 'all-gather(' in line]
  assert not [line for line in gathers if f'[{batch},' in line], gathers


def test_mesh_from_concrete_inputs(monkeypatch):
  """Eagerly, outside `activate` and with no `mesh=`, sharded inputs give the ring its mesh:
  the text blocks travel (`ppermute`) and the gradient comes back sharded like them."""
  image, text = _embeddings(seed=2, batch=40, dim=24)  # a shape no other test traces
  mesh = _mesh(dict(data=2, fsdp=4))
  put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh))
  permutes = []
  ppermute = jax.lax.ppermute
  monkeypatch.setattr(jax.lax, 'ppermute',
                      lambda *args, **kwargs: permutes.append(1) or ppermute(*args, **kwargs))
  want = losses.softmax_contrastive_loss(image, text, 20.0)
  value, grad = jax.value_and_grad(ring_losses.softmax_contrastive_loss)(
      put(image), put(text), 20.0)
  np.testing.assert_allclose(value, want, rtol=2e-6)
  assert permutes
  assert grad.sharding.is_equivalent_to(sharding.batch_sharding(mesh), 2)


@pytest.mark.parametrize('kind', ['sigmoid', 'softmax'])
def test_traced_without_any_mesh_raises(kind):
  """Traced with no mesh passed, none set and none in the inputs' sharding (8 devices): a
  ValueError that says what to do, never one gathered block."""
  image, text = _embeddings(batch=16)
  fn = getattr(ring_losses, f'{kind}_contrastive_loss')
  args = (image, text, 10.0, -10.0)[:4 if kind == 'sigmoid' else 3]
  with pytest.raises(ValueError, match=r'image_embeddings \(16, 32\).*traced.*Pass `mesh=` '
                     r'or trace inside `sharding.activate'):
    jax.jit(fn)(*args)
  # On host values there is nothing to split: one block, as before.
  np.testing.assert_allclose(fn(*args), getattr(losses, f'{kind}_contrastive_loss')(*args),
                             rtol=2e-6)


@pytest.fixture(scope='module')
def data_dir(shared_data_dir):
  return shared_data_dir


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
