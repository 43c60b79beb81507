"""Tests for the Tux Paint stamps dataset: parsing, skips, captions, images and splits.

The build tests need the apt package tuxpaint-stamps-default (.ci/setup installs it as root);
without it they fail, on purpose, rather than skip.
"""

import os
import unicodedata

import numpy as np
import pytest
import tensorflow_datasets as tfds

from mmjax.data import tuxpaint


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  """{split: list of examples} of the dataset built into a temporary directory."""
  assert tuxpaint.available(), (
      f'Tux Paint stamps not found in {tuxpaint.STAMPS_DIR}: install them with `apt-get install '
      f'--no-install-recommends {tuxpaint.APT_PACKAGE}` (.ci/setup does it when run as root)')
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  tfds.disable_progress_bar()
  tuxpaint.TuxPaint(data_dir=data_dir).download_and_prepare()
  builder = tuxpaint.TuxPaint(data_dir=data_dir)  # Reads back what was written.
  splits = {}
  for split in ('train', 'test'):
    source = builder.as_data_source(split)
    splits[split] = sorted((source[i] for i in range(len(source))), key=lambda x: x['label'])
  return builder.info, splits


def _text(x, key):
  return x[key].decode()


def _is_english_text(caption: str) -> bool:
  """No translation markers and no letters outside the Latin script."""
  return '.utf8=' not in caption and all(
      'LATIN' in unicodedata.name(c, '') for c in caption if c.isalpha())


def test_counts_labels_and_metadata(built):
  info, splits = built
  stamps, skipped = tuxpaint.find_stamps()
  examples = splits['train'] + splits['test']
  assert len(examples) == len(stamps) > 700  # 785 in tuxpaint-stamps-default 2022.06.04.
  assert 0.13 < len(splits['test']) / len(examples) < 0.17
  assert sorted(x['label'] for x in examples) == list(range(len(examples)))
  paths = [_text(x, 'path') for x in sorted(examples, key=lambda x: x['label'])]
  assert paths == sorted(paths) == [s.path for s in stamps]
  categories = info.metadata['categories']
  assert categories == sorted({_text(x, 'category') for x in examples})
  assert {'animals', 'food', 'symbols', 'vehicles'} <= set(categories)
  for x in examples:
    assert _text(x, 'category') == _text(x, 'path').split('/')[0]
  assert info.metadata['skipped'] == {k: len(v) for k, v in skipped.items() if v}
  assert info.metadata['skipped'].get('svg only', 0) > 100  # This version has 165.


def test_captions_are_english_sentences(built):
  _, splits = built
  examples = {_text(x, 'path'): _text(x, 'caption') for s in splits.values() for x in s}
  assert examples['animals/birds/owl.png'] == 'An owl.'
  assert examples['symbols/money/us/coins/025quarter.png'] == (
      'A US 25 cent piece ($.25) called a quarter.')
  assert examples['seasonal/christmas/German_Christmas_toy.png'] == (
      'A wooden toy from Germany called a "Räuchermännchen".')
  for path, caption in examples.items():
    assert caption == ' '.join(caption.split()) and caption, path
    assert _is_english_text(caption), (path, caption)
    assert caption[0].isupper() or not caption[0].isalpha(), (path, caption)
    with open(os.path.join(tuxpaint.STAMPS_DIR, path[:-4] + '.txt'), encoding='utf-8') as f:
      assert caption == ' '.join(f.readline().split()), path  # The English line, not another.


def test_images_are_stamps_on_white(built):
  _, splits = built
  for x in splits['train'] + splits['test']:
    image = x['image']
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert ((image < 250).any(-1).mean() > 0.03), _text(x, 'path')  # Never blank.
    # Cropped to its bounding box: the stamp spans (about) the whole image one way.
    rows, cols = np.nonzero((image < 255).any(-1))
    assert max(np.ptp(rows), np.ptp(cols)) >= 48, _text(x, 'path')
  # A colorable stamp drawn white in its file comes out black, as Tux Paint draws it.
  bolt = next(x for x in splits['train'] + splits['test']
              if _text(x, 'path') == 'naturalforces/lightningbolt.png')
  assert (bolt['image'] < 64).all(-1).sum() > 40  # A thin bolt in a grey glow; white before.


def test_splits_are_disjoint_and_deterministic(built):
  _, splits = built
  train = {_text(x, 'path') for x in splits['train']}
  test = {_text(x, 'path') for x in splits['test']}
  assert not train & test
  stamps, _ = tuxpaint.find_stamps()
  assert train | test == {s.path for s in stamps}
  expected = tuxpaint.split_stamps([s.caption for s in stamps])
  assert expected == tuxpaint.split_stamps([s.caption for s in stamps])
  assert test == {s.path for s, split in zip(stamps, expected) if split == 'test'}
  assert expected != tuxpaint.split_stamps([s.caption for s in stamps], seed=1)
  # Test captions are unique and never seen in training, even up to case and punctuation.
  key = tuxpaint.caption_key
  test_keys = [key(_text(x, 'caption')) for x in splits['test']]
  assert len(test_keys) == len(set(test_keys))
  assert not set(test_keys) & {key(_text(x, 'caption')) for x in splits['train']}


def test_split_stamps_sends_shared_captions_to_train():
  captions = ['A flower.', 'a flower', 'A cat.', 'A dog.', 'An owl.', 'A fox.']
  splits = tuxpaint.split_stamps(captions, test_fraction=0.5)
  assert splits[:2] == ['train', 'train'] and splits.count('test') == 3
  assert tuxpaint.split_stamps(captions, test_fraction=0.9).count('test') == 4  # All unique.


def test_english_caption():
  assert tuxpaint.english_caption('A  red\tapple. \nde.utf8=Ein Apfel.\n') == 'A red apple.'
  assert tuxpaint.english_caption('\ufeffA frog.\r\nfr.utf8=Une grenouille.\r\n') == 'A frog.'
  assert tuxpaint.english_caption('de.utf8=Ein Apfel.\nen_GB.utf8=An apple.\n') is None
  assert tuxpaint.english_caption('ca@valencia.utf8=Una poma.\n') is None
  assert tuxpaint.english_caption('') is None
  assert tuxpaint.english_caption('  \nde.utf8=Ein Apfel.') is None


def test_find_stamps_skips(tmp_path):
  """A miniature stamps directory with each kind of file the package has."""
  from PIL import Image
  files = {
      'animals/cat.txt': 'A cat.\nde.utf8=Eine Katze.\n',
      'animals/cat.dat': 'nomirror\n',
      'animals/cat.ogg': '',
      'animals/cat_desc_fr.ogg': '',
      'animals/owl.svg': '<svg/>',
      'animals/owl.txt': 'An owl.\n',
      'animals/fish.txt': 'de.utf8=Ein Fisch.\n',
      'symbols/one.txt': 'One.\n',
      'symbols/one.dat': 'colorable\nscale 30%\n',
      'seasonal/gift.txt': 'A gift.\n',
  }
  for path, text in files.items():
    os.makedirs(tmp_path / os.path.dirname(path), exist_ok=True)
    (tmp_path / path).write_text(text, encoding='utf-8')
  stamp = Image.new('RGBA', (20, 10))
  stamp.paste((255, 255, 255, 255), (5, 2, 15, 8))  # A white box; colorable draws it black.
  for path in ('animals/cat.png', 'animals/cat_mirror.png', 'animals/fish.png',
               'animals/dog.png', 'symbols/one.png'):
    stamp.save(tmp_path / path)

  stamps, skipped = tuxpaint.find_stamps(str(tmp_path))
  assert [(s.path, s.category, s.caption, s.colorable) for s in stamps] == [
      ('animals/cat.png', 'animals', 'A cat.', False),
      ('symbols/one.png', 'symbols', 'One.', True)]
  assert skipped == {'svg only': ['animals/owl.svg'], 'no text': ['animals/dog.png'],
                     'no English text': ['animals/fish.png'],
                     'text without image': ['seasonal/gift.txt']}
  cat, one = (tuxpaint.load_image(str(tmp_path), s) for s in stamps)
  assert cat.shape == one.shape == (64, 64, 3)
  assert (cat == 255).all()  # White on white (Tux Paint would too)...
  # ...but the colorable one is black, cropped and centred, padded to a square (with a little
  # ringing from the Lanczos upscaling).
  assert (one[16:48] < 16).all() and (one[:10] > 240).all() and (one[-10:] > 240).all()


def test_missing_package_is_a_clear_error(monkeypatch, tmp_path):
  monkeypatch.setattr(tuxpaint, 'STAMPS_DIR', str(tmp_path / 'nonexistent'))
  assert not tuxpaint.available()
  builder = tuxpaint.TuxPaint(data_dir=str(tmp_path / 'tfds'))
  with pytest.raises(FileNotFoundError, match=tuxpaint.APT_PACKAGE):
    builder.download_and_prepare()
