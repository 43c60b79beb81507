"""Evaluation: retrieval and zero-shot metrics against brute force, padding and mesh
invariance, and the evaluate entry point restoring an 8-device checkpoint on 1 device."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import config_lib
from mmjax import sharding
from mmjax import tasks
from mmjax.data import pipeline
from mmjax.evals import batching
from mmjax.evals import retrieval
from mmjax.evals import zeroshot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, 'configs', 'clip.py') + ':tiny'


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _brute_force_recall(images, texts, text_to_image, k):
  """Sorts every row and column in full; no shortcuts."""
  scores = images @ texts.T
  image_hits = []
  for i in range(len(images)):
    ranked = list(np.argsort(-scores[i]))
    image_hits.append(any(text_to_image[t] == i for t in ranked[:k]))
  text_hits = []
  for t in range(len(texts)):
    ranked = list(np.argsort(-scores[:, t]))
    text_hits.append(text_to_image[t] in ranked[:k])
  return np.mean(image_hits), np.mean(text_hits)


def test_recall_equals_brute_force_with_several_captions_per_image():
  rng = np.random.default_rng(0)
  images = _unit(rng.normal(size=(37, 8)))
  text_to_image = np.concatenate([np.arange(37), rng.integers(0, 37, 20)])
  # Captions near their image, so recall is far from both 0 and 1.
  texts = _unit(images[text_to_image] + 1.2 * rng.normal(size=(len(text_to_image), 8)))
  metrics = retrieval.recall_at_k(images, texts, text_to_image)
  for k in retrieval.RECALL_AT:
    image_to_text, text_to_image_recall = _brute_force_recall(images, texts, text_to_image, k)
    assert metrics[f'image_to_text/R@{k}'] == pytest.approx(image_to_text)
    assert metrics[f'text_to_image/R@{k}'] == pytest.approx(text_to_image_recall)
  assert 0.05 < metrics['text_to_image/R@1'] < 0.95


def test_top_k_hits_equal_brute_force():
  rng = np.random.default_rng(1)
  scores, labels = rng.normal(size=(50, 30)), rng.integers(0, 30, 50)
  for k in (1, 5, 10, 40):
    expected = [labels[i] in np.argsort(-scores[i])[:k] for i in range(50)]
    np.testing.assert_array_equal(zeroshot.top_k_hits(scores, labels, k), expected)


def _tokenize(texts, max_len=16):
  """Character codes as token ids (enough for a fake text encoder)."""
  out = np.zeros((len(texts), max_len), np.int32)
  for row, text in enumerate(texts):
    codes = [ord(c) % 97 + 1 for c in text[:max_len]]
    out[row, :len(codes)] = codes
  return out


def _fake_encoders():
  """Random linear encoders: params are two projection matrices."""
  def encode_image(params, images):
    return _l2(images.reshape(images.shape[0], -1) @ params['image'])

  def encode_text(params, token_ids):
    return _l2(jax.nn.one_hot(token_ids, 98).sum(1) @ params['text'])

  rng = np.random.default_rng(2)
  params = {'image': jnp.asarray(rng.normal(size=(4 * 4 * 3, 16)), jnp.float32),
            'text': jnp.asarray(rng.normal(size=(98, 16)), jnp.float32)}
  return encode_image, encode_text, params


def _l2(x):
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def _retrieval_split(n=29):
  rng = np.random.default_rng(3)
  return {'image': rng.uniform(-1, 1, (n, 4, 4, 3)).astype(np.float32),
          'caption': [f'caption {i} {"x" * (i % 5)}' for i in range(n)],
          'text_to_image': np.arange(n)}


@pytest.mark.parametrize('mesh_axes,batch_size', [(dict(data=1), 1000), (dict(data=1), 4),
                                                  (dict(data=8), 8), (dict(data=2, fsdp=4), 3),
                                                  (dict(data=4, tensor=2), 64)])
def test_retrieval_ignores_padding_batching_and_mesh(mesh_axes, batch_size):
  """29 examples: batches padded differently on each mesh give the brute-force numbers."""
  encode_image, encode_text, params = _fake_encoders()
  split = _retrieval_split()
  devices = jax.devices()[:int(np.prod(list(mesh_axes.values())))]
  mesh = sharding.make_mesh(mesh_axes, devices)
  evaluator = retrieval.RetrievalEvaluator(
      encode_image=encode_image, encode_text=encode_text, tokenize=_tokenize,
      splits={'test': split}, batch_size=batch_size, mesh=mesh)
  metrics = evaluator.run(params)

  images = np.asarray(encode_image(params, split['image']))
  texts = np.asarray(encode_text(params, _tokenize(split['caption'])))
  assert metrics['test/num_images'] == metrics['test/num_texts'] == 29
  for k in retrieval.RECALL_AT:
    image_to_text, text_to_image = _brute_force_recall(images, texts, split['text_to_image'], k)
    assert metrics[f'test/image_to_text/R@{k}'] == pytest.approx(image_to_text)
    assert metrics[f'test/text_to_image/R@{k}'] == pytest.approx(text_to_image)


def test_batched_apply_pads_to_the_mesh_and_drops_padding():
  mesh = sharding.make_mesh(dict(data=8), jax.devices())
  apply = batching.BatchedApply(lambda params, x: x * params, mesh, batch_size=5)
  assert apply.batch_size == 8
  inputs = np.arange(21, dtype=np.float32)[:, None]
  np.testing.assert_array_equal(apply(jnp.float32(2), inputs), 2 * inputs)
  with pytest.raises(ValueError, match='no inputs'):
    apply(jnp.float32(2), inputs[:0])


@pytest.mark.slow
def test_retrieval_splits_of_the_real_datasets(tmp_path):
  data_dir = str(tmp_path)
  for name, split_name in (('tuxpaint', 'test'), ('emoji', 'heldout_style')):
    pipeline.build(name, data_dir)
    split = pipeline.load_retrieval(name, data_dir, image_size=16)[split_name]
    count = len(split['caption'])
    assert count > 100 and split['image'].shape == (count, 16, 16, 3)
    assert len(set(split['caption'])) == count  # one distinct caption per image
    np.testing.assert_array_equal(split['text_to_image'], np.arange(count))
  assert split['caption'][0].startswith('an emoji of ')
  with pytest.raises(ValueError, match="'digits' has no retrieval splits"):
    pipeline.load_retrieval('digits', data_dir, image_size=8)


def test_retrieval_rejects_inconsistent_splits():
  encode_image, encode_text, _ = _fake_encoders()
  split = dict(_retrieval_split(), text_to_image=np.arange(1, 30))
  mesh = sharding.make_mesh(dict(data=1), jax.devices()[:1])
  with pytest.raises(ValueError, match='outside the 29 images'):
    retrieval.RetrievalEvaluator(encode_image=encode_image, encode_text=encode_text,
                                 tokenize=_tokenize, splits={'test': split}, batch_size=8,
                                 mesh=mesh)


def test_unknown_evaluator_type_is_named(tmp_path):
  config = config_lib.load(TINY, {'data.data_dir': str(tmp_path),
                                  'evals.zeroshot.type': 'zeroshott'})
  mesh = sharding.make_mesh(dict(data=1), jax.devices()[:1])
  with pytest.raises(ValueError, match=r'config.evals.zeroshot.type=.zeroshott'):
    tasks.get_task(config).evaluators(mesh)


def test_unknown_evaluator_option_and_missing_capability_are_named(tmp_path):
  config = config_lib.load(TINY, {'data.data_dir': str(tmp_path)})
  mesh = sharding.make_mesh(dict(data=1), jax.devices()[:1])
  with config.unlocked():
    config.evals.zeroshot.templatez = 'hand'
  with pytest.raises(ValueError, match=r'config.evals.zeroshot: .zeroshot. evaluators take no '
                                       r'option .templatez.'):
    tasks.get_task(config).evaluators(mesh)
  with config.unlocked():
    config.evals = dict(reconstruction=dict(type='reconstruction', batch_size=8))
  with pytest.raises(ValueError, match=r'config.evals.reconstruction needs the image_tokenizer '
                                       r"capability; this task offers \['dual_encoder'\]"):
    tasks.get_task(config).evaluators(mesh)


def test_building_a_task_writes_no_data(tmp_path):
  """A task's modules, params shapes and evaluator data format come without touching disk."""
  data_dir = tmp_path / 'data'
  config = config_lib.load(TINY, {'data.data_dir': str(data_dir)})
  task = tasks.get_task(config)
  jax.eval_shape(task.init, jax.random.PRNGKey(0))
  task.eval_data()
  assert not data_dir.exists()


@pytest.mark.slow
def test_checkpoint_from_8_devices_evaluates_on_1_device(tiny_clip_run, xla_flags):
  """A run trained on an fsdp x data mesh of 8, evaluated by `python -m mmjax.evaluate` on 1
  CPU device."""
  workdir, data_dir, step = tiny_clip_run.workdir, tiny_clip_run.data_dir, tiny_clip_run.step
  train_metrics = tiny_clip_run.eval_metrics
  assert train_metrics['zeroshot/test/top1'] > 0.2  # learned something: chance is 0.1

  env = dict(os.environ, XLA_FLAGS=xla_flags(1), MMJAX_DATA_DIR=data_dir)
  result = subprocess.run(
      [sys.executable, '-m', 'mmjax.evaluate', f'--workdir={workdir}'], cwd=REPO, env=env,
      capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'evaluating data-parallel' in result.stdout  # fsdp=4 x data=2 cannot fit 1 device
  with open(os.path.join(workdir, 'eval', f'metrics_{step}.json')) as f:
    eval_metrics = json.load(f)
  assert eval_metrics['mesh'] == {'data': 1, 'fsdp': 1, 'tensor': 1}
  for key, value in train_metrics.items():
    assert eval_metrics[key] == pytest.approx(value, abs=1e-6), key
  for name in ('loss_curve.png', 'eval_curves.png', f'eval/zeroshot_report_{step}.json'):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name

  missing = subprocess.run(
      [sys.executable, '-m', 'mmjax.evaluate', f'--workdir={workdir}', '--step=7'], cwd=REPO,
      env=env, capture_output=True, text=True, timeout=600)
  assert missing.returncode != 0 and 'no checkpoint for step 7' in missing.stderr


@pytest.mark.parity
@pytest.mark.slow
def test_evaluate_imported_hf_clip_equals_torch_zero_shot(tmp_path, xla_flags):
  """`--hf_dir`: a saved HF CLIPModel evaluates to the zero-shot accuracy torch gives."""
  import torch  # pylint: disable=g-import-not-at-top  (the test extra's reference model)
  import transformers  # pylint: disable=g-import-not-at-top
  from mmjax.data import captions, digits
  from mmjax.data.tokenizers import ClipTokenizer

  torch.manual_seed(0)
  tower = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=64, hidden_act='quick_gelu')
  hf_model = transformers.CLIPModel(transformers.CLIPConfig(
      vision_config=dict(image_size=8, patch_size=2, **tower),
      text_config=dict(vocab_size=49408, max_position_embeddings=48, pad_token_id=0,
                       bos_token_id=49406, eos_token_id=49407, **tower),
      projection_dim=16)).eval()
  hf_dir, data_dir, workdir = (str(tmp_path / name) for name in ('hf', 'data', 'run'))
  hf_model.save_pretrained(hf_dir)

  result = subprocess.run(
      [sys.executable, '-m', 'mmjax.evaluate', f'--workdir={workdir}', f'--hf_dir={hf_dir}',
       f'--config={TINY}', '--config.data.tokenizer=clip_bpe',
       f'--config.data.data_dir={data_dir}'],
      cwd=REPO, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, XLA_FLAGS=xla_flags(1)))
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(workdir, 'eval', 'metrics_0.json')) as f:
    metrics = json.load(f)

  split = pipeline.load_eval('digits', 'test', data_dir, image_size=8)
  templates = captions.zeroshot_templates('digits', 'hand')
  token_ids = ClipTokenizer().encode(
      [t.format(name) for name in digits.NAMES for t in templates], 48)
  with torch.no_grad():
    images = hf_model.get_image_features(
        pixel_values=torch.from_numpy(split['image']).permute(0, 3, 1, 2))
    texts = hf_model.get_text_features(input_ids=torch.from_numpy(token_ids).long())
  images = getattr(images, 'pooler_output', images).numpy()
  texts = getattr(texts, 'pooler_output', texts).numpy()
  classes = _unit(_unit(texts).reshape(len(digits.NAMES), len(templates), -1).mean(1))
  scores = _unit(images) @ classes.T
  for k in (1, 5):
    expected = np.mean(zeroshot.top_k_hits(scores, split['label'], k))
    assert metrics[f'zeroshot/test/top{k}'] == pytest.approx(expected, abs=1e-9)
