"""The text -> image evaluator: its judge scores agree with the zero-shot evaluator on the same
images, and a tiny Chameleon generates, is judged by a CLIP run and writes its grid."""

import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from mmjax import config_lib
from mmjax import sharding
from mmjax import tasks
from mmjax.evals import capabilities
from mmjax.data import pipeline
from mmjax.data.tokenizers.byte import EarlyFusionTokenizer
from mmjax.evals import text_to_image
from mmjax.evals.zeroshot import ZeroShotEvaluator
from mmjax.tasks import pretrained

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_left_padded():
  tokens, mask = text_to_image.left_padded([np.array([5, 6, 7]), np.array([9])])
  np.testing.assert_array_equal(tokens, [[5, 6, 7], [0, 0, 9]])
  np.testing.assert_array_equal(mask, [[True, True, True], [False, False, True]])


@pytest.mark.slow
def test_judged_real_images_score_as_zero_shot(tiny_clip_run):
  """A 'generator' returning each prompt's real held-out image: the evaluator's top-k are
  the judge's zero-shot top-k on those images, computed by the zero-shot evaluator."""
  data_dir, mesh = tiny_clip_run.data_dir, sharding.make_mesh(dict(data=1), jax.devices()[:1])
  pipeline.build('emoji', data_dir)
  split = pipeline.load_eval('emoji', 'test_seen', data_dir, 8)
  picks = np.linspace(0, len(split['label']) - 1, 40).astype(int)
  images, labels = split['image'][picks], split['label'][picks]
  judge_task = tasks.get_task(tiny_clip_run.config)
  dual = judge_task.capabilities().dual_encoder
  judge_params = pretrained.newest_params(tiny_clip_run.workdir)
  real = jnp.asarray(images)
  evaluator = text_to_image.TextToImageEvaluator(
      generate=lambda params, batch: real[batch['seed'] % 1_000_003],
      judge=capabilities.Judge(dual, judge_params),
      score=None, tokenizer=EarlyFusionTokenizer(32),
      class_names=pipeline.class_names('emoji', data_dir), templates=['{}'], images=images,
      labels=labels, num_image_tokens=16, batch_size=16, mesh=mesh)
  metrics = evaluator.run(params={})
  zeroshot = ZeroShotEvaluator(
      encode_image=dual.encode_image, encode_text=dual.encode_text, tokenize=dual.tokenize,
      class_names=pipeline.class_names('emoji', data_dir), templates=['{}'],
      splits={'real': {'image': images, 'label': labels}}, batch_size=16, mesh=mesh)
  want = zeroshot.run(judge_params)
  for k in (1, 5):
    assert metrics[f'conditional/top{k}'] == want[f'real/top{k}']
    assert metrics[f'unconditional/top{k}'] == want[f'real/top{k}']
  assert metrics['chance/top5'] == 5 / len(pipeline.class_names('emoji', data_dir))


@pytest.mark.slow
def test_tiny_chameleon_generates_and_writes_its_grid(tiny_clip_run, tmp_path):
  config = config_lib.load(os.path.join(REPO, 'configs', 'chameleon.py') + ':tiny', {
      'data.data_dir': tiny_clip_run.data_dir, 'judge.clip_workdir': tiny_clip_run.workdir,
      'evals': {'text_to_image': {'type': 'text_to_image', 'batch_size': 8,
                                  'num_prompts': 12}}})
  mesh = sharding.make_mesh(dict(data=1), jax.devices()[:1])
  task = tasks.get_task(config)
  with sharding.activate(mesh):
    params = sharding.strip_boxes(task.init(jax.random.key(0)))
    evaluator = task.evaluators(mesh)['text_to_image']
    metrics = evaluator.run(params)
  for key in ('conditional/top1', 'conditional/top5', 'unconditional/top5'):
    assert 0 <= metrics[key] <= 1, key
  # The codes' likelihood given the caption and without: both finite, a random LM ~log(32).
  for key in ('image_nll/captioned', 'image_nll/uncaptioned'):
    assert 1 < metrics[key] < 10, (key, metrics[key])
  [path] = evaluator.write_report(str(tmp_path), step=0)
  grid = np.asarray(Image.open(path))
  assert grid.shape[1] == 8 * (96 + 4) + 4 and grid.std() > 10
  # The generated images are decoded codes: different seeds, different images.
  assert len({evaluator.last_images['conditional'][i].tobytes() for i in range(12)}) > 6


def test_a_text_to_image_eval_without_a_judge_is_named(tmp_path):
  config = config_lib.load(os.path.join(REPO, 'configs', 'chameleon.py') + ':tiny', {
      'data.data_dir': str(tmp_path), 'evals': {'t2i': {'type': 'text_to_image',
                                                        'batch_size': 8}}})
  mesh = sharding.make_mesh(dict(data=1), jax.devices()[:1])
  with pytest.raises(ValueError, match=r'config.evals.t2i needs a judge.*clip_workdir'):
    tasks.get_task(config).evaluators(mesh)
