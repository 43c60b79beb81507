"""The Chameleon task in the training loop: its rows, both modalities learning, the frozen
tokenizer loaded from a VQ run of ours, and a sharded step equal to one device."""

import os

import jax
import numpy as np
import pytest

from mmjax import config_lib
from mmjax import sharding
from mmjax import tasks
from mmjax import train
from mmjax.data import early_fusion
from mmjax.data.tokenizers.byte import BOS_ID, PAD_ID, EarlyFusionTokenizer
from mmjax.tasks import pretrained
from training_steps import flat_params, train_steps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHAMELEON = os.path.join(REPO, 'configs', 'chameleon.py')
VQ_TINY = os.path.join(REPO, 'configs', 'vq.py') + ':tiny'


@pytest.fixture(scope='module')
def data_dir(shared_data_dir):
  return shared_data_dir


def chameleon_config(data_dir, **overrides):
  return config_lib.load(f'{CHAMELEON}:tiny', {'data.data_dir': data_dir, **overrides})




def test_caption_to_image_rows():
  tokenizer = EarlyFusionTokenizer(num_codes=32)
  rows = early_fusion.caption_to_image_rows(tokenizer, ['red apple', 'a' * 40],
                                            num_image_tokens=4, max_len=20)
  begin, end, image = tokenizer.begin_image_id, tokenizer.end_image_id, tokenizer.image_id
  text = list(tokenizer.encode_text('red apple.'))
  want = [BOS_ID] + text + [begin] + [image] * 4 + [end]
  np.testing.assert_array_equal(rows['tokens'][0, :len(want)], want)
  assert (rows['tokens'][0, len(want):] == PAD_ID).all()
  # Weighted targets: the four codes and the end marker, nothing of the caption.
  np.testing.assert_array_equal(rows['targets'][0][rows['loss_weights'][0] == 1],
                                [image] * 4 + [end])
  # The long caption is cut from its end, the image kept whole; the last row has none.
  assert rows['caption_cut'].tolist() == [False, True, False]
  assert (rows['tokens'][1, -6:] == [begin] + [image] * 4 + [end]).all()
  np.testing.assert_array_equal(rows['tokens'][2, :7], [BOS_ID, begin] + [image] * 4 + [end])
  assert rows['loss_weights'].sum(1).tolist() == [5, 5, 5]


def test_early_fusion_tokenizer_layout():
  tokenizer = EarlyFusionTokenizer(num_codes=512)
  assert tokenizer.vocab_size == 774 and tokenizer.image_token_offset == 262
  assert tokenizer.image_ids(2).tolist() == [260, 259, 259, 261]
  assert tokenizer.image_ids(0).tolist() == []
  ids = np.concatenate([tokenizer.encode_text('ok'), [260, 300, 261], [tokenizer.eos_id]])
  assert tokenizer.decode(ids) == 'ok'


@pytest.mark.slow
def test_tiny_trains_both_modalities(data_dir):
  config = chameleon_config(data_dir, **{'data.caption_dropout': 0.0})
  before, after, history = train_steps(config, steps=40)
  first, last = history[:5], history[-5:]
  mean = lambda rows, key: np.mean([row[key] for row in rows])
  for key in ('text_loss', 'image_loss'):
    assert mean(last, key) < mean(first, key) - 0.5, key
  # The tokenizer is frozen; every LM param moves.
  changed = {name for name in before if not np.array_equal(before[name], after[name])}
  assert changed == {name for name in before if name.startswith("['lm']")}


@pytest.mark.slow
def test_sharded_step_equals_one_device(data_dir):
  config = chameleon_config(data_dir, **{'model.language_model.num_kv_heads': 2,
                                         'model.language_model.norm_placement': 'swin'})
  _, ref_params, ref_history = train_steps(config, steps=2)
  _, params, history = train_steps(config, steps=2, mesh_axes=dict(data=2, fsdp=2, tensor=2))
  for key in ('loss', 'text_loss', 'image_loss'):
    np.testing.assert_allclose([h[key] for h in history], [h[key] for h in ref_history],
                               rtol=1e-5, err_msg=key)
  for name, want in ref_params.items():
    np.testing.assert_allclose(params[name], want, rtol=1e-4, atol=1e-6, err_msg=name)


@pytest.mark.slow
def test_tokenizer_loads_from_a_vq_run(data_dir, tmp_path):
  vq_dir = str(tmp_path / 'vq')
  train.run(config_lib.load(VQ_TINY, {'data.data_dir': data_dir, 'seed': 1, 'evals': {}}),
            vq_dir, stop_at_step=0)
  vq_params = flat_params({'tokenizer': pretrained.newest_params(vq_dir)})
  config = chameleon_config(data_dir, **{'init.vq_from': vq_dir})
  before, after, _ = train_steps(config, steps=1)
  for name, want in vq_params.items():
    np.testing.assert_array_equal(before[name], want, err_msg=name)
    np.testing.assert_array_equal(after[name], want, err_msg=name)
  other = str(tmp_path / 'vq_64')
  train.run(config_lib.load(VQ_TINY, {'data.data_dir': data_dir, 'model.num_codes': 64,
                                      'evals': {}}), other, stop_at_step=0)
  with pytest.raises(ValueError, match=r'config.model.vq.num_codes=32 vs 64'):
    train_steps(chameleon_config(data_dir, **{'init.vq_from': other}), steps=0)


def test_bad_configs_name_the_key(data_dir):
  with pytest.raises(ValueError, match='config.data.num_image_tokens'):
    tasks.validate_config(chameleon_config(data_dir, **{'data.num_image_tokens': 4}), 1)
  with pytest.raises(ValueError, match='config.model.language_model.vocab_size'):
    tasks.validate_config(chameleon_config(
        data_dir, **{'model.language_model.vocab_size': 300}), 1)
  with pytest.raises(ValueError, match='unknown row kinds'):
    tasks.validate_config(chameleon_config(data_dir, **{'data.weights': {'emoji_nam': 1.0}}), 1)
  with pytest.raises(ValueError, match='norm_placement'):
    tasks.validate_config(chameleon_config(
        data_dir, **{'model.language_model.norm_placement': 'post'}), 1)


@pytest.mark.slow
def test_stability_evaluator_equals_numpy(data_dir):
  """`stability` metrics over batches (padded last batch) equal numpy over the same rows."""
  from mmjax.evals import stability
  config = config_lib.load(f'{CHAMELEON}:tiny,stability', {'data.data_dir': data_dir})
  task = tasks.get_task(config)
  params = task.init(jax.random.key(0))
  mesh = sharding.make_mesh(dict(data=1), jax.devices()[:1])
  with sharding.activate(mesh):
    evaluator = stability.stability_from_config(
        task.capabilities(), task.eval_data(), mesh, name='stability', batch_size=24,
        num_rows=30, kinds=('emoji_group',))
    got = evaluator.run(params)
    sums = np.zeros(5)
    for rows in evaluator.groups.values():
      assert len(rows['tokens']) % 24  # a padded last batch
      tokens, targets = jax.jit(task.sequences)(params, rows)
      logits = np.asarray(jax.jit(lambda p, t: task.model.apply({'params': p}, t)[0])(
          params, tokens), np.float64)
      top = logits.max(-1, keepdims=True)
      logsumexp = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
      nll = logsumexp - np.take_along_axis(logits, np.asarray(targets)[..., None], -1)[..., 0]
      code = np.asarray(targets) >= task.tokenizer.image_token_offset
      w = rows['loss_weights']
      sums += [(w * nll * ~code).sum(), (w * ~code).sum(), (w * nll * code).sum(),
               (w * code).sum(), (w * logsumexp).sum()]
  assert sums[1] > 0 and sums[3] > 0  # both modalities are scored
  np.testing.assert_allclose(got['text_loss'], sums[0] / sums[1], rtol=1e-5)
  np.testing.assert_allclose(got['image_loss'], sums[2] / sums[3], rtol=1e-5)
  np.testing.assert_allclose(got['logsumexp'], sums[4] / (sums[1] + sums[3]), rtol=1e-5)
  assert np.isfinite(got['max_attention_logit'])
  # Untrained, the model is no better than a uniform guess: that counts as diverged.
  assert got['diverged'] == float(max(got['text_loss'], got['image_loss'])
                                  > np.log(task.tokenizer.vocab_size))


def test_stability_evaluator_flags_divergence():
  """`diverged` is 1 for a non-finite statistic or a loss above ln(vocab), else 0."""
  from mmjax.evals.stability import StabilityEvaluator
  mesh = sharding.make_mesh(dict(data=1), jax.devices()[:1])
  rows = {'image': np.zeros((3, 2, 2, 3), np.float32), 'tokens': np.zeros((3, 4), np.int32),
          'targets': np.zeros((3, 4), np.int32), 'loss_weights': np.ones((3, 4), np.float32)}

  def statistics_of(nll, max_logit):
    def statistics(params, batch):
      shape = batch['tokens'].shape
      return {'log_prob': -nll * jax.numpy.ones(shape), 'logsumexp': jax.numpy.ones(shape),
              'is_image': jax.numpy.arange(shape[1])[None].repeat(shape[0], 0) % 2 == 0,
              'max_attention_logit': max_logit * jax.numpy.ones(shape[:1])}
    return statistics

  def diverged(nll, max_logit):
    with sharding.activate(mesh):
      return StabilityEvaluator(statistics=statistics_of(nll, max_logit), groups={'a': rows},
                                vocab_size=100, batch_size=2, mesh=mesh).run({})['diverged']

  assert diverged(2.0, 30.0) == 0.0
  assert diverged(np.log(100) + 0.1, 30.0) == 1.0
  assert diverged(2.0, np.nan) == 1.0
  assert diverged(np.inf, 3.0) == 1.0
