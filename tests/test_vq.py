"""The VQ image tokenizer: quantizer and losses against hand-written references, the
l2-normalised / EMA / dead-code options' effects, the GAN term's gradients, the
reconstruction metrics, sharded training equal to one device, and a tiny run end to end."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from scipy import signal

from mmjax import config_lib
from mmjax import losses
from mmjax import sharding
from mmjax import tasks
from mmjax import train
from mmjax.evals import reconstruction
from mmjax.models import vq

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, 'configs', 'vq.py') + ':tiny'


@pytest.fixture(scope='module')
def data_dir(shared_data_dir):
  return shared_data_dir


def tiny_config(data_dir, **overrides):
  return config_lib.load(TINY, {'data.data_dir': data_dir, **overrides})


def test_quantize_matches_hand_written_reference():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(2, 3, 3, 4)).astype(np.float32)
  codebook = rng.normal(size=(10, 4)).astype(np.float32)
  weights = rng.normal(size=z.shape).astype(np.float32)

  flat = z.reshape(-1, 4)
  tokens = np.argmin(((flat[:, None] - codebook[None]) ** 2).sum(-1), axis=1)
  codes = codebook[tokens]
  mse = np.mean((flat - codes) ** 2)

  out = vq.quantize(jnp.asarray(z), jnp.asarray(codebook))
  np.testing.assert_array_equal(out.tokens.reshape(-1), tokens)
  np.testing.assert_allclose(out.quantized.reshape(-1, 4), codes, atol=1e-6)
  np.testing.assert_allclose(out.codebook_loss, mse, rtol=1e-6)
  np.testing.assert_allclose(out.commitment_loss, mse, rtol=1e-6)

  # loss = <w, quantized> + a * codebook_loss + b * commitment_loss
  a, b = 0.7, 0.25
  def loss(z, codebook):
    q = vq.quantize(z, codebook)
    return jnp.sum(weights * q.quantized) + a * q.codebook_loss + b * q.commitment_loss
  grad_z, grad_codebook = jax.grad(loss, argnums=(0, 1))(jnp.asarray(z), jnp.asarray(codebook))
  # Straight-through: d<w, q>/dz = w; the commitment term pulls z to its code; nothing
  # else reaches z. The codebook loss pulls each code to its latents; nothing else reaches it.
  want_z = weights.reshape(-1, 4) + b * 2 * (flat - codes) / flat.size
  want_codebook = np.zeros_like(codebook)
  np.add.at(want_codebook, tokens, a * 2 * (codes - flat) / flat.size)
  np.testing.assert_allclose(grad_z.reshape(-1, 4), want_z, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(grad_codebook, want_codebook, rtol=1e-5, atol=1e-7)


def test_pixel_and_gan_losses():
  rng = np.random.default_rng(1)
  x, y = rng.normal(size=(2, 2, 5, 5, 3)).astype(np.float32)
  np.testing.assert_allclose(losses.pixel_loss(x, y, 'l1'), np.abs(x - y).mean(), rtol=1e-6)
  np.testing.assert_allclose(losses.pixel_loss(x, y, 'l2'), ((x - y) ** 2).mean(), rtol=1e-6)
  real, fake = rng.normal(size=(2, 4, 3, 3, 1)).astype(np.float32)
  np.testing.assert_allclose(
      losses.hinge_discriminator_loss(real, fake),
      0.5 * (np.maximum(0, 1 - real).mean() + np.maximum(0, 1 + fake).mean()), rtol=1e-6)
  np.testing.assert_allclose(losses.hinge_generator_loss(fake), -fake.mean(), rtol=1e-6)


def test_l2_normalised_codes_pick_by_angle():
  codebook = jnp.array([[1.0, 0.0], [10.0, 1.0]])
  z = jnp.array([[9.0, 0.0]])
  # Euclidean: [10, 1] is nearest; by angle [1, 0] is exact.
  assert int(vq.quantize(z, codebook).tokens[0]) == 1
  out = vq.quantize(z, codebook, normalize=True)
  assert int(out.tokens[0]) == 0
  np.testing.assert_allclose(out.quantized, [[1.0, 0.0]], atol=1e-6)
  rng = np.random.default_rng(2)
  z = jnp.asarray(rng.normal(size=(50, 8)), jnp.float32)
  codebook = jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
  normalised = vq.quantize(z, codebook, normalize=True)
  np.testing.assert_allclose(jnp.linalg.norm(normalised.quantized, axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_array_equal(vq.quantize(z * 7.0, codebook * 0.1, normalize=True).tokens,
                                normalised.tokens)
  unit = lambda a: a / jnp.linalg.norm(a, axis=1, keepdims=True)
  cosine = unit(z) @ unit(codebook).T
  np.testing.assert_array_equal(normalised.tokens, np.argmax(cosine, axis=1))


def _quantizer(codebook, usage, ema=False):
  params = {'codebook': jnp.asarray(codebook, jnp.float32),
            'usage': jnp.asarray(usage, jnp.float32)}
  if ema:
    params['ema_sum'] = params['codebook'] * params['usage'][:, None]
  return params


def test_ema_codebook_moves_codes_to_their_latents_without_gradients():
  rng = np.random.default_rng(3)
  centres = np.array([[2.0, 2.0], [-2.0, -2.0]])
  latents = np.concatenate([centres[0] + 0.3 * rng.normal(size=(30, 2)),
                            centres[1] + 0.3 * rng.normal(size=(10, 2))]).astype(np.float32)
  codebook = np.array([[1.0, 1.0], [-1.0, -1.0], [5.0, -5.0], [-5.0, 5.0]])
  params = _quantizer(codebook, np.full(4, 0.25), ema=True)
  decay = 0.9
  tokens = vq.quantize(jnp.asarray(latents), params['codebook']).tokens
  update = vq.codebook_update(params, latents, tokens, jax.random.key(0), decay=decay,
                              restart_threshold=0.0, ema=True)
  new, _ = vq.apply_codebook_update(params, update, ema=True, epsilon=0.0)
  # One step by hand: usage and sums are EMAs of the batch's shares and means.
  share = np.array([30, 10, 0, 0]) / 40
  sums = np.stack([latents[:30].sum(0), latents[30:].sum(0), [0, 0], [0, 0]]) / 40
  usage = decay * 0.25 + (1 - decay) * share
  ema_sum = decay * codebook * 0.25 + (1 - decay) * sums
  np.testing.assert_allclose(new['usage'], usage, rtol=1e-6)
  np.testing.assert_allclose(new['ema_sum'], ema_sum, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new['codebook'], ema_sum / usage[:, None], rtol=1e-5)
  # Repeated, the used codes converge on their clusters' means; unused ones fade to the
  # origin (sums and usage both decay, then the smoothing epsilon dominates): what the
  # dead-code restarts are for.
  for _ in range(200):
    tokens = vq.quantize(jnp.asarray(latents), new['codebook']).tokens
    update = vq.codebook_update(new, latents, tokens, jax.random.key(0), decay=decay,
                                restart_threshold=0.0, ema=True)
    new, metrics = vq.apply_codebook_update(new, update, ema=True)
  np.testing.assert_allclose(new['codebook'][0], latents[:30].mean(0), atol=1e-3)
  np.testing.assert_allclose(new['codebook'][1], latents[30:].mean(0), atol=1e-3)
  assert np.abs(new['codebook'][2:]).max() < 0.1
  assert float(metrics['codes_restarted']) == 0


@pytest.mark.parametrize('ema', [False, True])
def test_dead_codes_are_restarted_on_batch_latents(ema):
  rng = np.random.default_rng(4)
  latents = rng.normal(size=(64, 3)).astype(np.float32)
  codebook = np.concatenate([[[0.0, 0.0, 0.0]], 50 + rng.normal(size=(7, 3))])
  # Code 0 takes every latent; codes 1..7 are far away and their usage has decayed.
  usage = np.array([0.99] + [1e-4] * 7)
  params = _quantizer(codebook, usage, ema)
  tokens = vq.quantize(jnp.asarray(latents), params['codebook']).tokens
  assert len(np.unique(tokens)) == 1

  kept = vq.codebook_update(params, latents, tokens, jax.random.key(0), decay=0.99,
                            restart_threshold=0.0, ema=ema)  # restarts off
  unchanged, _ = vq.apply_codebook_update(params, kept, ema=ema)
  np.testing.assert_allclose(unchanged['codebook'][1:], codebook[1:], rtol=1e-2)

  update = vq.codebook_update(params, latents, tokens, jax.random.key(0), decay=0.99,
                              restart_threshold=0.03, ema=ema)  # dead: usage < 0.03 / 8
  new, metrics = vq.apply_codebook_update(params, update, ema=ema)
  assert float(metrics['codes_restarted']) == 7
  for row in np.asarray(new['codebook'][1:]):  # each revived code sits on a batch latent
    assert np.min(np.abs(latents - row).max(axis=1)) < 1e-5
  np.testing.assert_allclose(new['usage'][1:], 1 / 8)
  revived = vq.quantize(jnp.asarray(latents), new['codebook']).tokens
  assert len(np.unique(revived)) >= 5


@pytest.mark.slow
def test_model_tokenize_detokenize_shapes():
  model = vq.VQModel(base_channels=8, channel_multiplier=(1, 2), num_res_blocks=1,
                     attn_resolutions=(4,), resolution=8, latent_channels=8, num_codes=32,
                     code_dim=4, norm_groups=4)
  images = jax.random.uniform(jax.random.key(0), (2, 8, 8, 3), minval=-1, maxval=1)
  params = jax.jit(model.init)(jax.random.key(1), images)['params']
  assert 'attn_0' in params['encoder']['down_1'] and 'attn_0' in params['decoder']['up_1']
  assert 'attn_0' not in params['encoder']['down_0']
  apply = jax.jit(model.apply, static_argnames='method')
  tokens = apply({'params': params}, images, method='tokenize')
  assert tokens.shape == (2, 16) and tokens.dtype == jnp.int32
  images_back = apply({'params': params}, tokens, method='detokenize')
  out = apply({'params': params}, images)
  assert images_back.shape == images.shape
  np.testing.assert_allclose(images_back, out['reconstruction'], atol=1e-5)


def _reference_ssim(x, y):
  """SSIM of two [h, w] images with an explicit 11x11 Gaussian window, 'valid' positions."""
  g = signal.windows.gaussian(11, 1.5)
  window = np.outer(g, g) / np.outer(g, g).sum()
  filt = lambda a: signal.correlate2d(a, window, mode='valid')
  mx, my = filt(x), filt(y)
  vx, vy, cxy = filt(x * x) - mx ** 2, filt(y * y) - my ** 2, filt(x * y) - mx * my
  c1, c2 = 0.01 ** 2, 0.03 ** 2
  return np.mean((2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))


def test_reconstruction_metrics_match_references():
  rng = np.random.default_rng(5)
  x = rng.uniform(size=(3, 24, 24, 3))
  y = np.clip(x + 0.1 * rng.normal(size=x.shape), 0, 1)
  want_ssim = [np.mean([_reference_ssim(x[i, ..., c], y[i, ..., c]) for c in range(3)])
               for i in range(3)]
  np.testing.assert_allclose(reconstruction.ssim(x, y), want_ssim, rtol=1e-10)
  np.testing.assert_allclose(reconstruction.ssim(x, x), 1.0)
  np.testing.assert_allclose(reconstruction.psnr(x, y),
                             [-10 * np.log10(((x[i] - y[i]) ** 2).mean()) for i in range(3)])
  tokens = np.array([[0, 0, 1, 1], [2, 2, 2, 2]])
  metrics = reconstruction.codebook_metrics(tokens, num_codes=8)
  p = np.array([2, 2, 4]) / 8
  assert metrics['codebook_usage'] == 3 / 8
  np.testing.assert_allclose(metrics['perplexity'], np.exp(-(p * np.log(p)).sum()))


def test_evaluator_counts_each_image_once_on_a_mesh(tmp_path):
  """Padded sharded batches: the metrics are those of the whole set, for any batch size."""
  rng = np.random.default_rng(6)
  images = rng.uniform(-1, 1, (21, 8, 8, 3)).astype(np.float32)
  # A fake tokenizer: each pixel's red channel quantized to 4 levels; detokenize -> grey.
  tokenize = lambda params, x: jnp.clip(((x[..., 0] + 1) * 2).astype(jnp.int32), 0, 3).reshape(
      x.shape[0], -1)
  detokenize = lambda params, t: jnp.repeat(
      (t.reshape(t.shape[0], 8, 8, 1) / 2.0 - 0.75), 3, axis=-1) * params
  mesh = sharding.make_mesh(dict(data=-1))
  results = []
  for batch_size in (5, 64):
    evaluator = reconstruction.ReconstructionEvaluator(
        tokenize=tokenize, detokenize=detokenize, num_codes=8,
        splits={'a': images[:13], 'b': images[13:]}, batch_size=batch_size, mesh=mesh)
    results.append(evaluator.run(jnp.float32(1.0)))
  for key in results[0]:
    np.testing.assert_allclose(results[0][key], results[1][key], rtol=1e-6, err_msg=key)
  tokens = np.asarray(tokenize(None, images))
  recon = np.asarray(detokenize(1.0, tokens))
  unit = reconstruction.to_unit_range
  np.testing.assert_allclose(results[0]['all/psnr'],
                             reconstruction.psnr(unit(images), unit(recon)).mean(), rtol=1e-6)
  assert results[0]['all/codebook_usage'] == len(np.unique(tokens)) / 8
  assert results[0]['a/num_images'] == 13
  paths = evaluator.write_report(str(tmp_path), step=3)
  assert [os.path.basename(p) for p in paths] == ['reconstruction_a_3.png',
                                                  'reconstruction_b_3.png']
  assert Image.open(paths[0]).size[0] > 8 * 64


def test_config_errors_name_the_key(data_dir):
  cases = [({'data.image_size': 7}, 'config.data.image_size=7 is not divisible'),
           ({'model.base_channels': 12}, r'base_channels \* channel_multiplier\[0\]=12'),
           ({'loss.pixel': 'l3'}, "config.loss.pixel='l3'"),
           ({'quantizer.decay': 1.0}, 'config.quantizer.decay'),
           ({'batch_size': 12}, 'config.batch_size=12 is not divisible')]
  for overrides, message in cases:
    with pytest.raises(ValueError, match=message):
      tasks.validate_config(tiny_config(data_dir, **overrides), 8)
  tasks.validate_config(tiny_config(data_dir), 8)


def _steps(config, mesh_axes, batches):
  """Metrics of each step, then the params, training on `mesh_axes` (None: one device)."""
  devices = jax.devices()[:1] if mesh_axes is None else jax.devices()
  mesh = sharding.make_mesh(mesh_axes or dict(data=1), devices)
  with sharding.activate(mesh):
    trainer = train.Trainer(config, mesh)
    state = trainer.init_state(jax.random.PRNGKey(0))
    history = []
    for batch in batches:
      state, metrics = trainer.train_step(
          state, sharding.global_batch(batch, trainer.batch_sharding))
      history.append(jax.device_get(metrics))
  return history, state['params']


@pytest.mark.slow
def test_sharded_training_matches_one_device(data_dir):
  # Restarts and the EMA codebook: every non-gradient update runs on the mesh too.
  config = tiny_config(data_dir, **{'quantizer.restart_threshold': 0.03, 'quantizer.ema': True})
  mesh = sharding.make_mesh(dict(data=1), jax.devices()[:1])
  with sharding.activate(mesh):
    data = train.Trainer(config, mesh).task.train_iterator(process_index=0, process_count=1)
    batches = [{'image': next(data)['image']} for _ in range(3)]
  ref_history, ref_params = _steps(config, None, batches)
  assert ref_history[0]['codes_restarted'] == config.model.num_codes  # usage starts at 0
  assert ref_history[-1]['loss'] < ref_history[0]['loss']

  # The batch over all 8 devices, the weights over 4 of them.
  history, params = _steps(config, dict(data=2, fsdp=4), batches)
  for got, want in zip(history, ref_history):
    assert 'codebook_update' not in got and got.keys() == want.keys()
    for key in ('loss', 'pixel_loss', 'commitment_loss', 'grad_norm', 'codes_restarted'):
      np.testing.assert_allclose(got[key], want[key], rtol=1e-5, err_msg=key)
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(params),
                               jax.tree.leaves(ref_params)):
    name = jax.tree_util.keystr(path)
    if name.endswith("['k']['bias']"):
      # The softmax over keys ignores what the key bias adds to every logit of a query, so its
      # gradient is rounding noise, which Adam scales to ~1e-6 steps: it stays near its zero
      # init on both meshes but need not agree between them.
      assert np.abs(np.asarray(got)).max() < 1e-4 and np.abs(np.asarray(want)).max() < 1e-4
      continue
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5,
                               err_msg=name)
  np.testing.assert_allclose(np.sum(params['quantizer']['usage']), 1.0, rtol=1e-4)
  kernel = params['encoder']['down_1']['block_0']['conv1']['kernel']
  assert kernel.addressable_shards[0].data.shape[-1] * 4 == kernel.shape[-1]


@pytest.mark.slow
def test_frozen_codebook_gets_no_ema_update_or_restart(data_dir):
  """`config.trainable` leaving the quantizer out freezes it against the non-gradient EMA and
  dead-code-restart updates too, while the rest trains."""
  config = tiny_config(data_dir, **{'quantizer.restart_threshold': 0.03, 'quantizer.ema': True,
                                    'trainable': '(encoder|decoder)/.*'})
  mesh = sharding.make_mesh(dict(data=1), jax.devices()[:1])
  with sharding.activate(mesh):
    trainer = train.Trainer(config, mesh)
    initial = jax.device_get(trainer.init_state(jax.random.PRNGKey(0))['params'])
    data = trainer.task.train_iterator(process_index=0, process_count=1)
    batches = [{'image': next(data)['image']} for _ in range(2)]
  history, params = _steps(config, None, batches)
  assert 'codes_restarted' not in history[0]  # every code is dead at init, none restarted
  for name in ('codebook', 'usage', 'ema_sum'):
    np.testing.assert_array_equal(np.asarray(params['quantizer'][name]),
                                  initial['quantizer'][name], err_msg=name)
  assert np.any(np.asarray(params['decoder']['conv_out']['kernel'])
                != initial['decoder']['conv_out']['kernel'])


@pytest.mark.slow
def test_gan_terms_reach_only_their_own_side(data_dir):
  config = tiny_config(data_dir, **{'loss.gan_weight': 0.5, 'loss.gan_start': 5,
                                    'loss.discriminator.channels': 16,
                                    'loss.discriminator.norm_groups': 8,
                                    'loss.discriminator.num_layers': 1})
  mesh = sharding.make_mesh(dict(data=1), jax.devices()[:1])
  with sharding.activate(mesh):
    trainer = train.Trainer(config, mesh)
    task = trainer.task
    params = trainer.init_state(jax.random.PRNGKey(0))['params']
    data = task.train_iterator(process_index=0, process_count=1)
    batch = {'image': jnp.asarray(next(data)['image'])}

    def terms(params):
      loss, metrics = task.loss(params, batch, jax.random.key(1))
      return jnp.stack([loss, metrics['gan_generator_loss'], metrics['gan_discriminator_loss']])

    jacobian = jax.jit(jax.jacrev(terms))
    before = jax.device_get(jacobian(params))  # gan_steps = 0 < gan_start
    after = jax.device_get(jacobian(dict(params, gan_steps=jnp.float32(5))))

  disc = lambda g, i: [x[i] for x in jax.tree.leaves(g['discriminator'])]
  tokenizer = lambda g, i: [x[i] for x in jax.tree.leaves(
      {k: v for k, v in g.items() if k != 'discriminator'})]
  nonzero = lambda leaves: any(np.any(x != 0) for x in leaves)
  # The generator term moves only the tokenizer, the discriminator term only the discriminator.
  assert nonzero(tokenizer(after, 1)) and not nonzero(disc(after, 1))
  assert nonzero(disc(after, 2)) and not nonzero(tokenizer(after, 2))
  # The total is pixel + VQ + 0.5 * generator + discriminator once gan_steps >= gan_start...
  for total, no_gan, generator in zip(tokenizer(after, 0), tokenizer(before, 0),
                                      tokenizer(after, 1)):
    np.testing.assert_allclose(total, no_gan + 0.5 * generator, rtol=1e-4, atol=1e-5)
  for total, discriminator in zip(disc(after, 0), disc(after, 2)):
    np.testing.assert_allclose(total, discriminator, rtol=1e-5, atol=1e-8)
  # ... and before it nothing reaches the discriminator.
  assert not nonzero(disc(before, 0))
  # update_params counts the steps.
  counted, _ = task.update_params(params, {}, jax.tree.map(lambda _: True, params))
  assert float(counted['gan_steps']) == 1.0


@pytest.mark.slow
def test_tiny_run_end_to_end(data_dir, tmp_path):
  config = tiny_config(data_dir, **{'quantizer.restart_threshold': 0.03,
                                    'total_steps': 60, 'eval_every': 60, 'log_every': 20})
  _, eval_metrics = train.run(config, str(tmp_path))
  with open(tmp_path / 'metrics.jsonl') as f:
    train_metrics = [json.loads(line) for line in f if 'train/loss' in line]
  assert train_metrics[-1]['train/pixel_loss'] < train_metrics[0]['train/pixel_loss']
  assert eval_metrics['reconstruction/test/codebook_usage'] > 0.5
  assert eval_metrics['reconstruction/test/psnr'] > 12
  png = tmp_path / 'eval' / 'reconstruction_test_60.png'
  assert png.exists()
