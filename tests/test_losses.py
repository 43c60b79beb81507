"""Contrastive losses against plain numpy references, on one device and sharded over 8."""

import jax
import numpy as np
import pytest

from mmjax import losses
from mmjax import sharding


def _unit_rows(rng, batch, dim):
  x = rng.normal(size=(batch, dim))
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _log_softmax(x, axis):
  x = x - x.max(axis=axis, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def softmax_reference(image, text, scale):
  """CLIP: mean over the two directions of the cross-entropy with the diagonal as labels."""
  logits = scale * image.astype(np.float64) @ text.T.astype(np.float64)
  image_to_text = -np.mean(np.diag(_log_softmax(logits, axis=1)))
  text_to_image = -np.mean(np.diag(_log_softmax(logits, axis=0)))
  return (image_to_text + text_to_image) / 2


def sigmoid_reference(image, text, scale, bias):
  """SigLIP: -sum(log sigmoid(z_ij * logit_ij)) / batch, z = +1 on the diagonal, -1 off it."""
  logits = scale * image.astype(np.float64) @ text.T.astype(np.float64) + bias
  labels = 2 * np.eye(len(image)) - 1
  return -np.sum(-np.log1p(np.exp(-labels * logits))) / len(image)


@pytest.mark.parametrize('mesh_axes', [None, dict(data=8), dict(data=2, fsdp=4),
                                       dict(data=2, fsdp=2, tensor=2)])
@pytest.mark.parametrize('scale,bias', [(1.0, 0.0), (14.3, -10.0), (100.0, -3.0)])
def test_losses_match_numpy(mesh_axes, scale, bias):
  rng = np.random.default_rng(0)
  image, text = _unit_rows(rng, 32, 16), _unit_rows(rng, 32, 16)
  text[:8] = image[:8]  # some exact matches, so the losses are not all near log(batch)
  args = (image, text)
  if mesh_axes is not None:
    mesh = sharding.make_mesh(mesh_axes)
    batch_sharding = sharding.batch_sharding(mesh)
    args = tuple(jax.device_put(x, batch_sharding) for x in args)
    assert len(args[0].sharding.device_set) == 8
    assert args[0].addressable_shards[0].data.shape[0] == 32 // sharding.data_parallel_size(mesh)
  softmax = losses.softmax_contrastive_loss(*args, scale)
  sigmoid = losses.sigmoid_contrastive_loss(*args, scale, bias)
  np.testing.assert_allclose(softmax, softmax_reference(image, text, scale), rtol=2e-5)
  np.testing.assert_allclose(sigmoid, sigmoid_reference(image, text, scale, bias), rtol=2e-5)


def test_sharded_loss_uses_the_global_batch():
  """Sharded over 8 devices the loss is not the mean of 8 per-shard losses."""
  rng = np.random.default_rng(1)
  image, text = _unit_rows(rng, 32, 16), _unit_rows(rng, 32, 16)
  mesh = sharding.make_mesh(dict(data=8))
  sharded = [jax.device_put(x, sharding.batch_sharding(mesh)) for x in (image, text)]
  global_loss = float(losses.softmax_contrastive_loss(*sharded, 10.0))
  per_shard = np.mean([softmax_reference(image[i:i + 4], text[i:i + 4], 10.0)
                       for i in range(0, 32, 4)])
  np.testing.assert_allclose(global_loss, softmax_reference(image, text, 10.0), rtol=2e-5)
  assert abs(global_loss - per_shard) > 0.5
