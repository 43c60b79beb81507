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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHAMELEON = os.path.join(REPO, 'configs', 'chameleon.py')
VQ_TINY = os.path.join(REPO, 'configs', 'vq.py') + ':tiny'


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('datasets'))


def chameleon_config(data_dir, **overrides):
  return config_lib.load(f'{CHAMELEON}:tiny', {'data.data_dir': data_dir, **overrides})


def _flat(params):
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(params))}


def _train(config, steps, mesh_axes=None):
  """(initial params, params after `steps` steps, per-step metrics) on one device or all 8."""
  devices = jax.devices() if mesh_axes else jax.devices()[:1]
  mesh = sharding.make_mesh(mesh_axes or dict(data=1), devices)
  with sharding.activate(mesh):
    trainer = train.Trainer(config, mesh)
    state = trainer.load_pretrained(trainer.init_state(jax.random.PRNGKey(0)))
    initial = _flat(state['params'])
    data = trainer.task.train_iterator(process_index=0, process_count=1)
    keys = trainer.task.batch_spec(1)
    history = []
    for _ in range(steps):
      batch = next(data)
      state, metrics = trainer.train_step(
          state, sharding.global_batch({k: batch[k] for k in keys}, trainer.batch_sharding))
      history.append({k: float(v) for k, v in metrics.items()})
  return initial, _flat(state['params']), history


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
  before, after, history = _train(config, steps=40)
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
  _, ref_params, ref_history = _train(config, steps=2)
  _, params, history = _train(config, steps=2, mesh_axes=dict(data=2, fsdp=2, tensor=2))
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
  vq_params = _flat({'tokenizer': pretrained.newest_params(vq_dir)})
  config = chameleon_config(data_dir, **{'init.vq_from': vq_dir})
  before, after, _ = _train(config, steps=1)
  for name, want in vq_params.items():
    np.testing.assert_array_equal(before[name], want, err_msg=name)
    np.testing.assert_array_equal(after[name], want, err_msg=name)
  other = str(tmp_path / 'vq_64')
  train.run(config_lib.load(VQ_TINY, {'data.data_dir': data_dir, 'model.num_codes': 64,
                                      'evals': {}}), other, stop_at_step=0)
  with pytest.raises(ValueError, match=r'config.model.vq.num_codes=32 vs 64'):
    _train(chameleon_config(data_dir, **{'init.vq_from': other}), steps=0)


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
