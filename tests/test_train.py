"""The training stack: mesh parity, config errors, exact resume, and real learning."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mmjax import config_lib
from mmjax import metrics_writer
from mmjax import sharding
from mmjax import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, 'configs', 'clip.py') + ':tiny'


@pytest.fixture(scope='module')
def data_dir(shared_data_dir):
  return shared_data_dir


def tiny_config(data_dir, **overrides):
  return config_lib.load(TINY, {'data.data_dir': data_dir, **overrides})


def _first_batches(trainer, count):
  data = trainer.task.train_iterator(process_index=0, process_count=1)
  keys = trainer.task.batch_spec(1)
  return [{key: batch[key] for key in keys} for batch in (next(data) for _ in range(count))]


def _run_steps(config, mesh_axes, batches):
  """Loss, gradients at step 0, then parameters after `len(batches)` steps on a mesh."""
  devices = jax.devices()[:1] if mesh_axes is None else jax.devices()
  mesh = sharding.make_mesh(mesh_axes or dict(data=1), devices)
  with sharding.activate(mesh):
    trainer = train.Trainer(config, mesh)
    state = trainer.init_state(jax.random.PRNGKey(0))
    put = lambda b: sharding.global_batch(b, trainer.batch_sharding)
    loss, _, grads = trainer.gradients(state['params'], put(batches[0]), jax.random.PRNGKey(1))
    losses = []
    for batch in batches:
      state, metrics = trainer.train_step(state, put(batch))
      losses.append(float(metrics['loss']))
  return float(loss), jax.device_get(grads), losses, state['params']


@pytest.fixture(scope='module')
def one_device_steps(data_dir):
  """(config, batches, the one-device run of `_run_steps` on them): the reference that every
  mesh of `test_sharded_training_matches_one_device` is compared with."""
  config = tiny_config(data_dir)
  mesh = sharding.make_mesh(dict(data=1), jax.devices()[:1])
  with sharding.activate(mesh):
    batches = _first_batches(train.Trainer(config, mesh), 3)
  return config, batches, _run_steps(config, None, batches)


# Pure data parallelism, and all three axes at once (data=2 x fsdp=4 against one device:
# test_vq).
@pytest.mark.parametrize('mesh_axes', [dict(data=8), dict(data=2, fsdp=2, tensor=2)])
@pytest.mark.slow
def test_sharded_training_matches_one_device(one_device_steps, mesh_axes):
  config, batches, (ref_loss, ref_grads, ref_losses, ref_params) = one_device_steps
  loss, grads, losses, params = _run_steps(config, mesh_axes, batches)

  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  assert ref_losses[-1] < ref_losses[0]
  # Float32 tolerance: sums run in another order on another mesh, so elements are compared
  # relative to the largest gradient (some, like the key bias's, are exactly zero in theory).
  grad_scale = max(np.abs(g).max() for g in jax.tree.leaves(ref_grads))
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * grad_scale)
  param_scale = max(np.abs(p).max() for p in jax.tree.leaves(ref_params))
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4,
                               atol=1e-5 * param_scale)

  kernel = params['image_tower']['transformer']['blocks']['mlp']['fc_in']['kernel']
  assert kernel.sharding.spec == P(None, 'fsdp', 'tensor')
  shard_shape = kernel.addressable_shards[0].data.shape
  ways = mesh_axes.get('fsdp', 1) * mesh_axes.get('tensor', 1)
  assert np.prod(shard_shape) * ways == np.prod(kernel.shape), (shard_shape, kernel.shape)


@pytest.mark.slow
def test_bad_key_is_named(data_dir):
  with pytest.raises(KeyError, match='model.image.widht'):
    tiny_config(data_dir, **{'model.image.widht': 64})
  result = subprocess.run(
      [sys.executable, '-m', 'mmjax.train', '--config', TINY, '--workdir', data_dir + '/bad',
       '--config.lrr=3e-4'], capture_output=True, text=True, cwd=REPO, timeout=120)
  assert result.returncode != 0
  assert 'lrr' in result.stderr


@pytest.mark.parametrize('overrides,message', [
    ({'mesh.data': 16}, r'config.mesh=.* needs 16 devices but only 8'),
    ({'batch_size': 100}, r'config.batch_size=100 is not divisible by the data-parallel size 8'),
    ({'mesh.data': 2, 'mesh.fsdp': 3}, r'config.mesh'),
    ({'model.image.width': 34, 'mesh.data': 2, 'mesh.fsdp': 4},
     r"state\['params'\]\['image_projection'\]\['kernel'\] has shape \(34, 64\): dimension 34 "
     r"is split over mesh axes \('fsdp',\)"),
])
def test_impossible_settings_fail_before_compiling(data_dir, tmp_path, overrides, message):
  config = tiny_config(data_dir, **overrides)
  with pytest.raises(ValueError, match=message):
    train.run(config, str(tmp_path))
  assert not os.path.exists(tmp_path / 'checkpoints' / '0')


@pytest.mark.slow
def test_sigterm_saves_and_resumes_exactly(data_dir, tmp_path, capsys):
  """A `python -m mmjax.train` process on an fsdp mesh gets SIGTERM mid-run: it saves and
  exits; resuming that checkpoint (here in this process) ends with exactly the parameters and
  the example sequence of an uninterrupted run."""
  steps = 40
  overrides = {'total_steps': steps, 'eval_every': 100000, 'checkpoint_every': 100000,
               'record_example_ids': True, 'evals': {}, 'mesh.data': 2, 'mesh.fsdp': 4,
               'data.data_dir': data_dir}
  config = config_lib.load(TINY, overrides)
  flags = [f'--config.{key}={value}' for key, value in overrides.items()]
  interrupted = tmp_path / 'interrupted'
  process = subprocess.Popen(
      [sys.executable, '-m', 'mmjax.train', '--config', TINY, '--workdir', str(interrupted),
       *flags], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  ids_file = interrupted / 'example_ids.0.jsonl'
  deadline = time.time() + 240
  while time.time() < deadline and process.poll() is None:
    if ids_file.exists() and len(ids_file.read_text().splitlines()) >= 10:
      process.send_signal(signal.SIGTERM)
      break
    time.sleep(0.05)
  output, _ = process.communicate(timeout=240)
  assert process.returncode == 0, output
  assert 'SIGTERM: saved step' in output, output
  stopped_at = int(output.split('SIGTERM: saved step')[1].split(',')[0])
  assert 10 <= stopped_at < steps
  assert os.listdir(interrupted / 'checkpoints') == [str(stopped_at)]

  capsys.readouterr()
  resumed, _ = train.run(config, str(interrupted))
  output = capsys.readouterr().out
  assert f'Resumed from step {stopped_at} ' in output and 'config differs' not in output
  straight, _ = train.run(config, str(tmp_path / 'straight'))
  assert int(resumed['step']) == int(straight['step']) == steps
  for got, want in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  ids_straight = train.read_example_ids(str(tmp_path / 'straight'))
  assert len(ids_straight) == steps
  assert train.read_example_ids(str(interrupted)) == ids_straight


def test_config_changes_name_what_a_resume_changes():
  saved = json.loads(json.dumps(config_lib.load(TINY).to_dict()))  # as a checkpoint holds it
  assert config_lib.changes(saved, config_lib.load(TINY).to_dict()) == []  # lists == tuples
  new = config_lib.load(TINY, {'total_steps': 7, 'schedule.warmup_steps': 3})
  assert config_lib.changes(saved, new.to_dict()) == [
      f'schedule.warmup_steps: {saved["schedule"]["warmup_steps"]!r} -> 3',
      f'total_steps: {saved["total_steps"]!r} -> 7']
  del saved['seed']
  assert f"seed: '<missing>' -> {new.seed!r}" in config_lib.changes(saved, new.to_dict())


def test_overrides_parse_as_literals_else_strings():
  assert config_lib.parse_overrides(['model.cross_attn_every=1', 'data.cue_at=name',
                                     'lr=1e-3', 'evals.x.shots=(0, 4)', 'a=b=c']) == {
      'model.cross_attn_every': 1, 'data.cue_at': 'name', 'lr': 1e-3,
      'evals.x.shots': (0, 4), 'a': 'b=c'}
  with pytest.raises(ValueError, match="'total_steps' is not KEY=VALUE"):
    config_lib.parse_overrides(['total_steps'])


@pytest.mark.slow
def test_tiny_clip_learns_zero_shot_digits(tiny_clip_run):
  config, workdir = tiny_clip_run.config, tiny_clip_run.workdir
  assert tiny_clip_run.step == config.total_steps
  top1 = tiny_clip_run.eval_metrics['zeroshot/test/top1']
  assert top1 > 0.6, tiny_clip_run.eval_metrics  # chance is 0.1
  assert os.path.exists(os.path.join(workdir, 'loss_curve.png'))
  records = metrics_writer.read_records(os.path.join(workdir, 'metrics.jsonl'))
  losses = [r['train/loss'] for r in records if 'train/loss' in r]
  assert len(losses) == config.total_steps // config.log_every
  assert losses[-1] < losses[0], losses


def _trainer(config, mesh_axes):
  mesh = sharding.make_mesh(mesh_axes, jax.devices()[:int(np.prod(list(mesh_axes.values())))])
  return mesh, train.Trainer(config, mesh)


@pytest.mark.slow
def test_gradient_accumulation_averages_micro_batches(data_dir):
  """k micro-batches (rows i, i+k, ...) give the mean of their separate gradients."""
  mesh_axes = dict(data=2, fsdp=2)
  accumulated_config = tiny_config(data_dir, grad_accum_steps=2)
  mesh, accumulated = _trainer(accumulated_config, mesh_axes)
  with sharding.activate(mesh):
    _, plain = _trainer(tiny_config(data_dir), mesh_axes)
    batch = _first_batches(plain, 1)[0]
    params = plain.init_state(jax.random.PRNGKey(0))['params']
    rng = jax.random.PRNGKey(1)
    put = lambda b: sharding.global_batch(b, plain.batch_sharding)
    loss, _, grads = accumulated.gradients(params, put(batch), rng)
    micro = [plain.gradients(params, put({k: v[i::2] for k, v in batch.items()}), rng)
             for i in range(2)]
  np.testing.assert_allclose(loss, (micro[0][0] + micro[1][0]) / 2, rtol=1e-5)
  full_batch_loss = float(plain.gradients(params, put(batch), rng)[0])
  assert abs(float(loss) - full_batch_loss) > 0.1  # fewer negatives per micro-batch
  scale = max(np.abs(g).max() for g in jax.tree.leaves(grads))
  for got, a, b in zip(*(jax.tree.leaves(g) for g in (grads, micro[0][2], micro[1][2]))):
    np.testing.assert_allclose(got, (np.asarray(a) + np.asarray(b)) / 2, rtol=1e-4,
                               atol=1e-5 * scale)


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_params(data_dir):
  mesh_axes = dict(data=8)
  f32_mesh, f32 = _trainer(tiny_config(data_dir), mesh_axes)
  with sharding.activate(f32_mesh):
    batch = sharding.global_batch(_first_batches(f32, 1)[0], f32.batch_sharding)
    state = f32.init_state(jax.random.PRNGKey(0))
    f32_loss = float(f32.gradients(state['params'], batch, jax.random.PRNGKey(1))[0])
    _, bf16 = _trainer(tiny_config(data_dir, compute_dtype='bfloat16'), mesh_axes)
    bf16_loss, _, bf16_grads = bf16.gradients(state['params'], batch, jax.random.PRNGKey(1))
    new_state, _ = bf16.train_step(state, batch)
  assert {g.dtype for g in jax.tree.leaves(bf16_grads)} == {np.dtype('float32')}
  assert {p.dtype for p in jax.tree.leaves(new_state['params'])} == {np.dtype('float32')}
  np.testing.assert_allclose(float(bf16_loss), f32_loss, rtol=2e-2)
  assert float(bf16_loss) != f32_loss  # the compute really ran in bfloat16


@pytest.mark.slow
def test_siglip_loss_falls(data_dir):
  config = config_lib.load(os.path.join(REPO, 'configs', 'siglip.py') + ':tiny',
                           {'data.data_dir': data_dir})
  mesh, trainer = _trainer(config, dict(data=2, fsdp=2, tensor=2))
  with sharding.activate(mesh):
    state = trainer.init_state(jax.random.PRNGKey(0))
    assert float(state['params']['logit_bias']) == -10.0
    data = trainer.task.train_iterator(process_index=0, process_count=1)
    losses = []
    for _ in range(60):
      batch = {key: value for key, value in next(data).items() if key != 'example_id'}
      state, metrics = trainer.train_step(state, sharding.global_batch(batch,
                                                                       trainer.batch_sharding))
      losses.append(float(metrics['loss']))
  assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10]), losses
