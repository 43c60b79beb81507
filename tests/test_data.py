"""Tests for the data layer: the TFDS builders, names and splits, and the train iterator."""

import collections
import importlib.util
import os

import numpy as np
import pytest
import sklearn.datasets

from mmjax.data import captions
from mmjax.data import digits
from mmjax.data import emoji
from mmjax.data import pipeline
from mmjax.data.tokenizers import ByteTokenizer

TOKENIZER = ByteTokenizer()


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('tfds'))
  pipeline.build('digits', path)
  pipeline.build('emoji', path)
  return path


def _split(name, split, data_dir):
  builder = {'digits': digits.Digits, 'emoji': emoji.Emoji}[name](data_dir=data_dir)
  source = builder.as_data_source(split)
  return [source[i] for i in range(len(source))]


def _iterator(data_dir, name='digits', **kwargs):
  kwargs = dict(tokenizer=TOKENIZER, image_size=16, max_text_len=48, global_batch_size=12,
                seed=0) | kwargs
  return pipeline.train_iterator(name, data_dir, **kwargs)


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_build_is_idempotent(data_dir):
  files = sorted(os.listdir(os.path.join(data_dir, 'digits', '1.0.0')))
  pipeline.build('digits', data_dir)
  assert sorted(os.listdir(os.path.join(data_dir, 'digits', '1.0.0'))) == files


def test_digits_splits_partition_the_dataset(data_dir):
  train, test = _split('digits', 'train', data_dir), _split('digits', 'test', data_dir)
  assert (len(train), len(test)) == (1437, 360)
  everything = sklearn.datasets.load_digits()
  expected = collections.Counter(
      (np.round(image * 255 / 16).astype(np.uint8).tobytes(), int(label))
      for image, label in zip(everything.images, everything.target))
  found = collections.Counter((x['image'].tobytes(), x['label']) for x in train + test)
  assert found == expected  # Same multiset of examples: disjoint and complete.
  test_counts = collections.Counter(x['label'] for x in test)
  assert all(34 <= test_counts[c] <= 38 for c in range(10))  # Stratified.
  for x in train[:50]:
    assert x['image'].shape == (8, 8, 1) and x['image'].dtype == np.uint8
    assert x['name'].decode() == digits.NAMES[x['label']]
    assert x['style'] == b'handwritten'
  assert max(x['image'].max() for x in train) == 255


def test_digits_names_and_eval_splits(data_dir):
  assert pipeline.class_names('digits', data_dir) == [
      'zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine']
  assert pipeline.unseen_names('digits', data_dir) == []
  assert pipeline.eval_splits('digits') == {'test': 'test'}
  assert pipeline.eval_splits('emoji') == {
      'heldout_style/seen': 'test_seen', 'heldout_style/unseen': 'test_unseen'}


def test_not_built_raises(tmp_path):
  with pytest.raises(FileNotFoundError, match='build'):
    pipeline.class_names('emoji', str(tmp_path))


@pytest.mark.parametrize('name', ['digits', 'emoji'])
def test_train_batches(data_dir, name):
  batch = next(_iterator(data_dir, name, image_size=24, global_batch_size=8))
  assert batch['image'].shape == (8, 24, 24, 3) and batch['image'].dtype == np.float32
  assert -1 <= batch['image'].min() < 0 < batch['image'].max() <= 1
  assert batch['text'].shape == (8, 48) and batch['text'].dtype == np.int32
  assert batch['example_id'].shape == (8,) and batch['example_id'].dtype == np.int32
  train = _split(name, 'train', data_dir)
  for ids, i in zip(batch['text'], batch['example_id']):
    assert ids[0] == TOKENIZER.bos_id
    caption = TOKENIZER.decode(ids)
    assert train[i]['name'].decode().lower() in caption
    assert any(t.format(train[i]['name'].decode()).lower() == caption
               for t in captions.TRAIN_TEMPLATES[name])


def test_digits_images_are_resized_grayscale(data_dir):
  batch = next(_iterator(data_dir, image_size=8))
  train = _split('digits', 'train', data_dir)
  expected = np.stack([train[i]['image'] for i in batch['example_id']]) / 127.5 - 1
  np.testing.assert_allclose(batch['image'], np.repeat(expected, 3, -1), atol=1e-6)


def test_load_eval(data_dir):
  test = pipeline.load_eval('digits', 'test', data_dir, image_size=16)
  assert test['image'].shape == (360, 16, 16, 3) and test['image'].dtype == np.float32
  assert test['label'].dtype == np.int32 and set(test['label']) == set(range(10))
  assert -1 <= test['image'].min() and test['image'].max() <= 1
  unseen = pipeline.load_eval('emoji', 'test_unseen', data_dir, image_size=32)
  names = pipeline.class_names('emoji', data_dir)
  assert {names[i] for i in unseen['label']} == set(pipeline.unseen_names('emoji', data_dir))


@pytest.mark.parametrize('name', ['digits', 'emoji'])
def test_hosts_split_each_global_batch(data_dir, name):
  single = _take(_iterator(data_dir, name), 4)
  hosts = [_take(_iterator(data_dir, name, process_index=p, process_count=2), 4) for p in (0, 1)]
  for step, batch in enumerate(single):
    local = [h[step] for h in hosts]
    assert all(b['example_id'].shape == (6,) for b in local)
    # Host blocks in process order are the one-host batch row for row, with the same
    # augmentation and caption for each element.
    for key in batch:
      np.testing.assert_array_equal(np.concatenate([b[key] for b in local]), batch[key])
    assert len(set(batch['example_id'].tolist())) == 12


def test_batch_size_must_split_over_hosts(data_dir):
  with pytest.raises(ValueError, match='divisible'):
    _iterator(data_dir, global_batch_size=10, process_count=3)


@pytest.mark.parametrize('name', ['digits', 'emoji'])
def test_resume_is_exact(data_dir, name):
  it = _iterator(data_dir, name, seed=7)
  _take(it, 3)
  state = it.get_state()
  expected = _take(it, 4)
  resumed = _iterator(data_dir, name, seed=7)
  resumed.set_state(state)
  for a, b in zip(expected, _take(resumed, 4)):
    for key in ('image', 'text', 'example_id'):
      np.testing.assert_array_equal(a[key], b[key])


def test_seeds_and_epochs(data_dir):
  ids = lambda it, n: np.concatenate([b['example_id'] for b in _take(it, n)])
  kwargs = dict(image_size=8, global_batch_size=479)  # 3 batches per epoch of 1,437.
  first = ids(_iterator(data_dir, seed=0, **kwargs), 6)
  np.testing.assert_array_equal(first, ids(_iterator(data_dir, seed=0, **kwargs), 6))
  assert not np.array_equal(first[:479], ids(_iterator(data_dir, seed=1, **kwargs), 1))
  epoch1, epoch2 = first[:1437], first[1437:]
  assert sorted(epoch1) == sorted(epoch2) == list(range(1437))
  assert not np.array_equal(epoch1, epoch2)


def test_emoji_splits(data_dir):
  names = pipeline.class_names('emoji', data_dir)
  unseen = set(pipeline.unseen_names('emoji', data_dir))
  assert names == sorted(names) and len(names) == len(set(names)) > 1000
  assert unseen < set(names)
  splits = {s: _split('emoji', s, data_dir)
            for s in ('train', 'test_seen', 'test_unseen', 'support_unseen')}
  for examples in splits.values():
    assert all(names[x['label']] == x['name'].decode() for x in examples)
    assert examples[0]['image'].shape == (64, 64, 3) and examples[0]['image'].dtype == np.uint8
  held_out = 'noto' if os.path.exists(emoji.NOTO_FONT) else 'openmoji_mono'
  styles = {s: {x['style'].decode() for x in examples} for s, examples in splits.items()}
  assert styles['test_seen'] == styles['test_unseen'] == {held_out}
  assert held_out not in styles['train'] and 'openmoji' in styles['train']
  assert styles['support_unseen'] <= styles['train']
  assert 'openmoji_mono' in styles['train'] | styles['test_seen']
  split_names = {s: {x['name'].decode() for x in examples} for s, examples in splits.items()}
  assert not split_names['train'] & unseen
  assert not split_names['test_seen'] & unseen
  assert split_names['test_unseen'] == unseen
  # Every unseen name has a drawing in another style, kept out of train: few-shot support.
  assert split_names['support_unseen'] == unseen
  assert 0.15 < len(unseen) / len(split_names['test_seen'] | unseen) < 0.25
  for examples in splits.values():  # Cropped to the glyph's bounding box: never blank
    # (the thinnest line art, openmoji_mono 'hundred points', inks 2% of its pixels).
    assert all((x['image'] < 250).any(-1).mean() > 0.015 for x in examples)


def test_emoji_fallback_glyphs_are_rejected():
  candidates = ['\U0001F600', 'a', '\uffff', '\U0001F600' * 2]  # Only the first is one emoji.
  drawn = emoji.draw_font(emoji.OPENMOJI_FONT, 100, candidates)
  assert list(drawn) == ['\U0001F600']


def test_emoji_pip_only(monkeypatch):
  for constant in ('NOTO_FONT', 'EMOJIONE_GLOB', 'EMOJI_TEST'):
    monkeypatch.setattr(emoji, constant, '/nonexistent')
  names = emoji.official_names()
  assert names['\U0001F600'] == 'grinning face' and len(names) > 1800
  assert not any(0x1F3FB <= ord(c) <= 0x1F3FF for e in names for c in e)
  styles = emoji.draw_styles(list(names)[:40])
  assert set(styles) == {'openmoji', 'openmoji_mono'}
  assert emoji.held_out_style(styles) == 'openmoji_mono'
  assert len(styles['openmoji_mono']) >= 35
  for e, image in styles['openmoji_mono'].items():
    assert image.shape == (64, 64, 3)
    assert np.all(image.max(-1) - image.min(-1) <= 1)  # Gray: the colours are gone.
    assert not np.array_equal(image, styles['openmoji'][e])


def test_caption_templates():
  for templates in (*captions.TRAIN_TEMPLATES.values(), *captions.ZEROSHOT_TEMPLATES.values()):
    assert len(templates) >= 5 and all(t.count('{}') == 1 for t in templates)
  assert captions.zeroshot_templates('emoji', 'name') == ['{}']
  assert captions.zeroshot_templates('emoji', 'hand') == captions.ZEROSHOT_TEMPLATES['emoji']
  with pytest.raises(ValueError, match='clip81'):
    captions.zeroshot_templates('emoji', 'clip81')


@pytest.mark.parity
def test_clip80_templates_are_openai_imagenet_prompts():
  """Our 80 prompts equal open_clip's copy of OpenAI's, in order."""
  reference = importlib.util.find_spec('open_clip')
  assert reference is not None, 'open-clip-torch is not installed: run bash .ci/setup'
  path = os.path.join(reference.submodule_search_locations[0], 'zero_shot_metadata.py')
  namespace = {}
  with open(path) as f:
    exec(f.read(), namespace)  # A plain data module: tuples of lambdas and class names.
  expected = [template('{}') for template in namespace['OPENAI_IMAGENET_TEMPLATES']]
  assert captions.zeroshot_templates('emoji', 'clip80') == expected
  assert len(expected) == 80
