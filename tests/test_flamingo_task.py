"""The Flamingo task in the training loop: interleaved rows, only the resampler and gated blocks
train (LM and vision bitwise frozen), a sharded loss equal to one device, and the few-shot
ranking evaluator."""

import os

import jax
import numpy as np
import pytest

from mmjax import config_lib
from mmjax import sharding
from mmjax import train
from mmjax.data import instruct
from mmjax.data import interleaved
from mmjax.evals import fewshot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAMINGO_TINY = os.path.join(REPO, 'configs', 'flamingo.py') + ':tiny'


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.getbasetemp() / 'instruct_tfds')  # Shared with test_captioning.
  instruct.build(path, ['emoji_name'])
  return path


def flamingo_config(data_dir, **overrides):
  return config_lib.load(FLAMINGO_TINY, {'data.data_dir': data_dir, **overrides})


def _flat(params):
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(params))}


def _train_on_one_batch(config, steps, mesh_axes=None):
  """(initial params, final params, losses, trainer, mesh, state) after `steps` steps, all on
  the first batch, on one device or on all 8 (`mesh_axes`)."""
  devices = jax.devices() if mesh_axes else jax.devices()[:1]
  mesh = sharding.make_mesh(mesh_axes or dict(data=1), devices)
  with sharding.activate(mesh):
    trainer = train.Trainer(config, mesh)
    state = trainer.init_state(jax.random.PRNGKey(0))
    initial = _flat(state['params'])
    batch = next(trainer.task.train_iterator(process_index=0, process_count=1))
    batch = {k: batch[k] for k in trainer.task.batch_spec(1)}
    losses = []
    for _ in range(steps):
      state, metrics = trainer.train_step(
          state, sharding.global_batch(batch, trainer.batch_sharding))
      losses.append(float(metrics['loss']))
  return initial, _flat(state['params']), losses, trainer, mesh, state


def test_interleaved_rows(data_dir):
  tokenizer = instruct.ByteLMTokenizer()
  row = interleaved.sequence(tokenizer, ['cat', 'dog'], max_len=48)
  text = lambda s: list(tokenizer.encode_text(s))
  image, eoc = tokenizer.image_id, interleaved.EOC_ID
  ids = ([257, image] + text('an emoji of cat.') + [eoc, image] + text('an emoji of dog.')
         + [eoc])
  np.testing.assert_array_equal(row['tokens'][:len(ids)], ids)
  assert not row['tokens'][len(ids):].any()
  np.testing.assert_array_equal(row['targets'][:-1], row['tokens'][1:])
  # Weighted: targets that are caption text or the EOC; not <image>, BOS or padding.
  weighted = row['targets'][row['loss_weights'] == 1]
  np.testing.assert_array_equal(weighted, text('an emoji of cat.') + [eoc]
                                + text('an emoji of dog.') + [eoc])

  batch = next(interleaved.train_iterator(
      data_dir, tokenizer=tokenizer, images_per_sequence=3, max_len=128, image_size=8,
      global_batch_size=4, seed=0))
  assert batch['image'].shape == (4, 3, 8, 8, 3) and batch['example_id'].shape == (4, 3)
  assert ((batch['tokens'] == image).sum(axis=1) == 3).all()


@pytest.fixture(scope='module')
def config(data_dir):
  # Two key/value heads, so that tensor=2 splits them (tiny has one: GQA).
  return flamingo_config(data_dir, lr=1e-2, **{'model.language_model.num_kv_heads': 2,
                                               'schedule.warmup_steps': 1})


@pytest.fixture(scope='module')
def one_device_run(config):
  """`_train_on_one_batch` of `config` for 6 steps on one device (compiled once per module)."""
  return _train_on_one_batch(config, steps=6)


def test_only_resampler_and_gated_blocks_train(one_device_run):
  before, after, losses, *_ = one_device_run
  part = lambda name: name.split("'")[1]
  assert {part(name) for name in before} == {
      'vision_tower', 'resampler', 'media_projection', 'lm', 'gated_xattn'}
  trained = {'resampler', 'media_projection', 'gated_xattn'}
  for name, value in before.items():
    if part(name) in trained:
      assert not np.array_equal(value, after[name]), name
    else:
      np.testing.assert_array_equal(value, after[name], err_msg=name)
  assert losses[-1] < losses[0] - 0.05, losses


def test_sharded_loss_equals_one_device(config, one_device_run):
  ref_losses = one_device_run[2][:3]
  losses = _train_on_one_batch(config, steps=3, mesh_axes=dict(data=2, fsdp=2, tensor=2))[2]
  assert ref_losses[2] != ref_losses[0]  # the third loss sees an update (lr is 0 at step 0)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-5)


def test_fewshot_evaluator_runs(one_device_run):
  *_, trainer, mesh, state = one_device_run
  evaluator = trainer.task.evaluators(mesh)['fewshot']
  split = evaluator.splits[4]
  assert split['image'].shape[:2] == (8 * 4, 5)  # 8 queries x 4 candidates; 4 demos + query
  for split in evaluator.splits.values():
    answers = [names[i] for names, i in zip(split['candidates'], split['answer_index'])]
    assert answers == split['answer']
  metrics = evaluator.run(state['params'])
  assert set(metrics) == {f'{k}shot/{m}' for k in (0, 1, 4)
                          for m in ('accuracy', 'num_examples')}
  for k in (0, 1, 4):
    assert 0 <= metrics[f'{k}shot/accuracy'] <= 1
    assert metrics[f'{k}shot/num_examples'] == 8


def test_fewshot_accuracy_of_hand_built_scores():
  """A scorer that gives the right candidate the top score gets 1; one that always picks
  candidate 0 gets the fraction of queries whose answer is candidate 0 (batch padding and row
  order included: 5 queries x 3 candidates in batches of 4)."""
  answer_index = np.array([2, 0, 1, 1, 0])
  n, c = len(answer_index), 3
  right = np.zeros((n, c), np.int32)
  right[np.arange(n), answer_index] = 1
  split = {'image': np.zeros((n * c, 1, 2, 2, 3), np.float32),
           'tokens': right.reshape(-1, 1), 'targets': np.zeros((n * c, 1), np.int32),
           'loss_weights': np.arange(n * c, dtype=np.float32).reshape(-1, 1),
           'answer_index': answer_index}
  mesh = sharding.make_mesh(dict(data=1), jax.devices()[:1])
  knows = fewshot.FewShotEvaluator(
      score_fn=lambda params, batch: batch['tokens'][:, 0].astype(np.float32),
      splits={1: split}, batch_size=4, mesh=mesh)
  assert knows.run(None) == {'1shot/accuracy': 1.0, '1shot/num_examples': 5}
  first = fewshot.FewShotEvaluator(  # scores decrease along the rows: candidate 0 wins
      score_fn=lambda params, batch: -batch['loss_weights'][:, 0], splits={0: split},
      batch_size=4, mesh=mesh)
  assert first.run(None)['0shot/accuracy'] == pytest.approx(2 / 5)
  assert fewshot.ranking_accuracy(np.array([[1, 1, 0], [0, 2, 1]]), [1, 1]) == 0.5
