"""Config validation: each impossible setting fails with an error naming its key before anything
compiles (or, for evaluation, before anything is built), on the real configs; no training, no
data on disk."""

import os

import jax
import ml_collections
import pytest

from mmjax import config_lib
from mmjax import evaluate
from mmjax import sharding
from mmjax import tasks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, 'configs')


def _load(spec, data_dir, **overrides):
  """`configs/<spec>` with its data under `data_dir` (which validation must not create)."""
  return config_lib.load(os.path.join(CONFIGS, spec), {'data.data_dir': str(data_dir),
                                                       **overrides})


@pytest.mark.parametrize('spec', [
    'clip.py:tiny', 'clip.py:small', 'clip.py:base', 'siglip.py:tiny', 'siglip.py:base',
    'vq.py:tiny', 'vq.py:small', 'vq.py:chameleon', 'llava.py:tiny', 'llava.py:small,stage1',
    'llava.py:tiny,text_only', 'flamingo.py:tiny', 'flamingo.py:small'])
def test_the_real_configs_pass(tmp_path, spec):
  data_dir = tmp_path / 'data'
  assert tasks.validate_config(_load(spec, data_dir), 8)['data'] == 8
  assert not data_dir.exists()


INTEGER_KEYS = ('batch_size', 'total_steps', 'grad_accum_steps', 'log_every', 'eval_every',
                'checkpoint_every', 'keep_checkpoints')


@pytest.mark.parametrize('value', [0, -1])
@pytest.mark.parametrize('key', INTEGER_KEYS)
def test_counts_below_one_are_named(tmp_path, key, value):
  """E.g. grad_accum_steps=0 was a ZeroDivisionError; log_every/eval_every/checkpoint_every=0
  passed and crashed in the training loop, after compiling."""
  config = _load('clip.py:tiny', tmp_path, **{key: value})
  with pytest.raises(ValueError, match=rf'config\.{key}={value} must be a positive integer'):
    tasks.validate_config(config, 8)


@pytest.mark.parametrize('key,value', [('log_every', 2.5), ('grad_accum_steps', True)])
def test_counts_that_are_not_integers_are_named(tmp_path, key, value):
  # As a config read back from JSON may hold them (a ConfigDict refuses them on an int key).
  config = ml_collections.ConfigDict({**_load('clip.py:tiny', tmp_path).to_dict(), key: value})
  with pytest.raises(ValueError, match=rf'config\.{key}={value} must be a positive integer'):
    tasks.validate_config(config, 8)


@pytest.mark.parametrize('key,value,message', [
    ('nonfinite', 'ignore', r"config\.nonfinite='ignore'; use one of \('stop', 'skip'\)"),
    ('inject_nonfinite_at_step', 0, r'config\.inject_nonfinite_at_step=0 must be None or a step'),
])
def test_nonfinite_policy_keys_are_checked(tmp_path, key, value, message):
  with pytest.raises(ValueError, match=message):
    tasks.validate_config(_load('clip.py:tiny', tmp_path, **{key: value}), 8)


@pytest.mark.parametrize('key,good,bad,message', [
    ('model.image.stem', 'conv', 'convolutional', r"config\.model\.image\.stem='convolutional'"),
    ('model.text.pool', 'mean', 'average', r"config\.model\.text\.pool='average'"),
    ('data.restyle_prob', 0.3, 1.5, r'config\.data\.restyle_prob=1\.5'),
])
def test_clip_tower_and_data_options_are_checked(tmp_path, key, good, bad, message):
  tasks.validate_config(_load('clip.py:small', tmp_path, **{key: good}), 8)
  with pytest.raises(ValueError, match=message):
    tasks.validate_config(_load('clip.py:small', tmp_path, **{key: bad}), 8)


@pytest.mark.parametrize('spec', ['clip.py:tiny', 'siglip.py:tiny', 'vq.py:tiny'])
def test_misspelled_dataset_name_is_named(tmp_path, spec):
  data_dir = tmp_path / 'data'
  config = _load(spec, data_dir, **{'data.name': 'digitz'})
  with pytest.raises(ValueError, match=r"config\.data\.name='digitz' is not a dataset; use one "
                                       r"of \('digits', 'emoji', 'tuxpaint'\)"):
    tasks.validate_config(config, 8)
  assert not data_dir.exists()


def test_llava_unknown_or_unweighted_question_kinds_are_named(tmp_path):
  """LLaVA reads its datasets through the question kinds of `config.data.weights`."""
  config = _load('llava.py:tiny', tmp_path)
  with config.unlocked():
    config.data.weights.emoji_nmae = 1.0
  with pytest.raises(ValueError, match=r"config\.data\.weights has unknown question kinds "
                                       r"\['emoji_nmae'\]"):
    tasks.validate_config(config, 8)
  with pytest.raises(ValueError, match=r'config\.data\.weights=.* gives no question kind a '
                                       r'positive weight'):
    tasks.validate_config(_load('llava.py:tiny', tmp_path, **{'data.weights.emoji_group': 0.0}),
                          8)
  with pytest.raises(ValueError, match=r'config\.data\.weights=.*: weights must be >= 0'):
    tasks.validate_config(_load('llava.py:tiny', tmp_path, **{'data.weights.emoji_group': -1.0}),
                          8)


def test_mesh_smaller_than_the_devices_is_refused():
  """The first prod(sizes) devices were taken silently (on several processes: all process
  0's); a caller that wants fewer devices passes them."""
  with pytest.raises(sharding.MeshSizeError,
                     match=r"config\.mesh=\{'data': 2, 'fsdp': 1, 'tensor': 1\} uses 2 devices "
                           r'but 8 are given.*set one axis to -1'):
    sharding.make_mesh(dict(data=2))
  with pytest.raises(ValueError, match=r'uses 4 devices but 8 are given'):
    sharding.mesh_shape(dict(data=2, fsdp=2), 8)
  with pytest.raises(ValueError, match=r'needs 16 devices but only 8 are available'):
    sharding.make_mesh(dict(data=16))
  subset = sharding.make_mesh(dict(data=2), jax.devices()[:2])
  assert list(subset.devices.flat) == jax.devices()[:2]
  whole = sharding.make_mesh(dict(data=-1, fsdp=2))
  assert dict(whole.shape) == {'data': 4, 'fsdp': 2, 'tensor': 1}
  assert whole.size == 8


def test_training_refuses_a_mesh_smaller_than_the_devices(tmp_path):
  """`mmjax.train.run` validates before compiling: the smaller mesh stops it there."""
  config = _load('clip.py:tiny', tmp_path, **{'mesh.data': 2})
  with pytest.raises(ValueError, match=r'config\.mesh=.* uses 2 devices but 8 are given'):
    tasks.validate_config(config, 8)
  assert tasks.validate_config(config, 2) == {'data': 2, 'fsdp': 1, 'tensor': 1}


def test_evaluation_mesh_falls_back_only_when_the_sizes_do_not_fit(tmp_path, capsys):
  config = _load('clip.py:tiny', tmp_path, **{'mesh.data': 2, 'mesh.fsdp': 4})
  assert dict(evaluate.evaluation_mesh(config, jax.devices()).shape) == {
      'data': 2, 'fsdp': 4, 'tensor': 1}
  assert 'data-parallel' not in capsys.readouterr().out
  # Trained on 8, evaluated on 1.
  mesh = evaluate.evaluation_mesh(config, jax.devices()[:1])
  assert dict(mesh.shape) == {'data': 1, 'fsdp': 1, 'tensor': 1}
  assert 'evaluating data-parallel over all of them' in capsys.readouterr().out
  # Trained on 2, evaluated with 8: all 8, not the first 2.
  config = _load('clip.py:tiny', tmp_path, **{'mesh.data': 2})
  mesh = evaluate.evaluation_mesh(config, jax.devices())
  assert dict(mesh.shape) == {'data': 8, 'fsdp': 1, 'tensor': 1}
  assert 'evaluating data-parallel over all of them' in capsys.readouterr().out


@pytest.mark.parametrize('axis,size,message', [
    ('dtaa', 2, r"config\.mesh has unknown axes \['dtaa'\]"),
    ('fsdp', 0, r'config\.mesh\.fsdp=0: sizes are positive or -1'),
    ('tensor', -1, r'config\.mesh: only one axis may be -1')])
def test_evaluation_mesh_raises_on_a_malformed_mesh(tmp_path, capsys, axis, size, message):
  """It used to catch every ValueError and evaluate data-parallel."""
  config = _load('clip.py:tiny', tmp_path)
  with config.unlocked():
    config.mesh[axis] = size
  with pytest.raises(ValueError, match=message):
    evaluate.evaluation_mesh(config, jax.devices())
  assert 'data-parallel' not in capsys.readouterr().out


@pytest.mark.parametrize('overrides,message', [
    ({'data.name': 'digitz'}, r"config\.data\.name='digitz'"),
    ({'grad_accum_steps': 0}, r'config\.grad_accum_steps=0 must be a positive integer'),
    ({'model.remat': 'dotz'}, r"config\.model\.remat='dotz'")])
def test_evaluate_validates_the_config_before_building_anything(tmp_path, overrides, message):
  data_dir, workdir = tmp_path / 'data', tmp_path / 'run'
  config = _load('clip.py:tiny', data_dir, **overrides)
  with pytest.raises(ValueError, match=message):
    evaluate.run(str(workdir), config=config)
  assert not data_dir.exists() and not workdir.exists()


def test_evaluate_does_not_check_the_training_batch_against_its_mesh(tmp_path, capsys):
  """A run trained on data=2 x fsdp=4 (batch 64) evaluates on 3 devices, data-parallel,
  though 64 does not divide by 3: evaluation reads no training batch."""
  config = _load('clip.py:tiny', tmp_path / 'data', evals={},
                 **{'mesh.data': 2, 'mesh.fsdp': 4})
  with pytest.raises(ValueError, match=r'config\.batch_size=64 is not divisible by the '
                                       r'data-parallel size 3'):
    tasks.validate_config(_load('clip.py:tiny', tmp_path / 'data'), 3)  # training on 3
  params = sharding.strip_boxes(tasks.get_task(config).init(jax.random.PRNGKey(0)))
  step, metrics, _ = evaluate.run(str(tmp_path / 'run'), config=config, params=params,
                                  devices=jax.devices()[:3])
  assert (step, metrics) == (0, {})
  assert 'evaluating data-parallel' in capsys.readouterr().out
