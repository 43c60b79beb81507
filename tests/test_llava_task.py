"""The LLaVA task in the training loop: the two stages' trainability, pretrained parts loaded
from our own runs, the text-only baseline, and a sharded step equal to one device."""

import os

from ml_collections import config_dict
import numpy as np
import pytest

from mmjax import config_lib
from mmjax import tasks
from mmjax import train
from mmjax.tasks import pretrained
from training_steps import flat_params, train_steps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAVA = os.path.join(REPO, 'configs', 'llava.py')
CLIP_TINY = os.path.join(REPO, 'configs', 'clip.py') + ':tiny'


@pytest.fixture(scope='module')
def data_dir(shared_data_dir):
  return shared_data_dir


def llava_config(data_dir, stage='stage2', **overrides):
  return config_lib.load(f'{LLAVA}:tiny,{stage}', {'data.data_dir': data_dir, **overrides})




def _changed(before, after):
  return {name for name in before if not np.array_equal(before[name], after[name])}


@pytest.mark.parametrize('stage, trained_parts', [('stage1', {'projector'}),
                                                  ('stage2', {'projector', 'lm'})])
@pytest.mark.slow
def test_stage_trains_only_its_parts(data_dir, stage, trained_parts):
  before, after, history = train_steps(llava_config(data_dir, stage), steps=3)
  losses = [m['loss'] for m in history]
  changed = _changed(before, after)
  part = lambda name: name.split("'")[1]
  assert {part(name) for name in changed} == trained_parts
  # Every param of a trained part moves (no frozen leftovers inside it).
  assert changed == {name for name in before if part(name) in trained_parts}
  if 'lm' in trained_parts:
    assert losses[-1] < losses[0]


@pytest.mark.slow
def test_sharded_step_equals_one_device(data_dir):
  # Two key/value heads, so that tensor=2 splits them (tiny has one: GQA).
  config = llava_config(data_dir, **{'model.language_model.num_kv_heads': 2})
  _, ref_params, ref_history = train_steps(config, steps=2)
  _, params, history = train_steps(config, steps=2, mesh_axes=dict(data=2, fsdp=2, tensor=2))
  np.testing.assert_allclose([m['loss'] for m in history], [m['loss'] for m in ref_history],
                             rtol=1e-5)
  for name, want in ref_params.items():
    np.testing.assert_allclose(params[name], want, rtol=1e-4, atol=1e-6, err_msg=name)


def _run_to_checkpoint(config, workdir):
  """`workdir` of a run of `config` that saved its first checkpoint and stopped, as if
  preempted before step 1 (no train step compiled). The tests give these runs seed 1, so
  their params differ from those a seed-0 model initialises itself: a part that failed to
  load cannot look loaded."""
  train.run(config, workdir, stop_at_step=0)
  return workdir


@pytest.mark.slow
def test_parts_load_from_our_runs(data_dir, tmp_path):
  # A CLIP run whose image tower has one block more than the LLaVA vision tower.
  clip_config = config_lib.load(CLIP_TINY, {
      'data.data_dir': data_dir, 'model.image.width': 32, 'model.image.num_heads': 2,
      'model.image.depth': 2, 'seed': 1, 'evals': {}})
  clip_dir = _run_to_checkpoint(clip_config, str(tmp_path / 'clip'))
  lm_dir = _run_to_checkpoint(
      llava_config(data_dir, 'text_only', seed=1, evals={}), str(tmp_path / 'lm'))

  config = llava_config(data_dir, 'stage1', **{'init.vision_from': clip_dir,
                                              'init.lm_from': lm_dir})
  loaded, _, _ = train_steps(config, steps=0)
  clip = flat_params(_read(clip_dir))
  lm = flat_params(_read(lm_dir))
  for name, value in loaded.items():
    if name.startswith("['lm']"):
      np.testing.assert_array_equal(value, lm[name], err_msg=name)
    elif name.startswith("['vision_tower']['transformer']"):
      clip_name = name.replace("['vision_tower']", "['image_tower']")
      np.testing.assert_array_equal(value, clip[clip_name][:1], err_msg=name)  # block 0 of 2
    elif name.startswith("['vision_tower']"):
      np.testing.assert_array_equal(
          value, clip[name.replace("['vision_tower']", "['image_tower']")], err_msg=name)
  assert any(name.startswith("['vision_tower']['transformer']") for name in loaded)
  # A workdir without the wanted part is named in the error.
  init = lambda **paths: config_dict.ConfigDict(
      dict(dict(vision_from='', lm_from='', params_from='', params_parts=''), **paths))
  with pytest.raises(ValueError, match=r"init.lm_from=.*clip.* holds no LM"):
    pretrained.init_parts(init(lm_from=clip_dir))
  with pytest.raises(ValueError, match='init.vision_from=.*lm.* holds no CLIP image tower'):
    pretrained.init_parts(init(vision_from=lm_dir), dict(depth=1))

  # Stage 1 -> stage 2: everything comes from the stage-1 run.
  stage1_dir = _run_to_checkpoint(
      llava_config(data_dir, 'stage1', seed=1, evals={}, **{
          'init.vision_from': clip_dir, 'init.lm_from': lm_dir}), str(tmp_path / 'stage1'))
  stage2, _, _ = train_steps(llava_config(data_dir, **{'init.params_from': stage1_dir}), steps=0)
  stage1 = flat_params(_read(stage1_dir))
  assert stage2.keys() == stage1.keys()
  for name, value in stage2.items():
    np.testing.assert_array_equal(value, stage1[name], err_msg=name)
  # Only the projector from stage 1; the LM from lm_from, the rest fresh.
  only_projector, _, _ = train_steps(llava_config(data_dir, **{
      'init.params_from': stage1_dir, 'init.params_parts': 'projector', 'init.lm_from': lm_dir}),
      steps=0)
  fresh_equal_to_stage1 = []
  for name, value in only_projector.items():
    source = stage1 if name.startswith("['projector']") else lm if name.startswith("['lm']") else {}
    if source:
      np.testing.assert_array_equal(value, source[name], err_msg=name)
    else:
      fresh_equal_to_stage1.append(np.array_equal(value, stage1[name]))
  assert fresh_equal_to_stage1 and not all(fresh_equal_to_stage1)  # a new vision tower
  with pytest.raises(ValueError, match=r"params_parts: .*stage1.* holds no \['resampler'\]"):
    pretrained.init_parts(init(params_from=stage1_dir, params_parts='resampler'))
  with pytest.raises(ValueError, match='params_parts=.*needs config.init.params_from'):
    pretrained.init_parts(init(params_parts='projector'))


def _read(workdir):
  return pretrained.newest_params(workdir)


@pytest.mark.slow
def test_mismatched_pretrained_part_names_the_param(data_dir, tmp_path):
  clip_config = config_lib.load(CLIP_TINY, {
      'data.data_dir': data_dir, 'evals': {}})
  clip_dir = _run_to_checkpoint(clip_config, str(tmp_path / 'clip_wide'))  # width 64, not 32
  config = llava_config(data_dir, **{'init.vision_from': clip_dir})
  with pytest.raises(ValueError, match=r"vision_tower.*shape"):
    train_steps(config, steps=0)


def test_bad_configs_name_the_key(data_dir):
  with pytest.raises(ValueError, match='config.data.num_image_tokens'):
    tasks.validate_config(llava_config(data_dir, **{'data.num_image_tokens': 4}), 1)
  with pytest.raises(ValueError, match='config.trainable'):
    train_steps(llava_config(data_dir, trainable='vision/.*'), steps=0)
