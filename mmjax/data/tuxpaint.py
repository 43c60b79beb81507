"""Tux Paint's rubber stamps with their English descriptions, as a TFDS dataset (no TF needed).

Source: the apt package `tuxpaint-stamps-default` (GPL-2+), which installs
`/usr/share/tuxpaint/stamps/<category>/.../<stamp>.{png,svg}`. Beside each image, `<stamp>.txt`
holds the description: its first line is English, every further line a translation written
`<locale>.utf8=<text>` (e.g. `de.utf8=...`, `en_GB.utf8=...`). `<stamp>.dat` holds Tux Paint
drawing hints, one a line (colorable, tintable, nomirror, noflip, scale ...); only
`colorable` is used: Tux Paint paints such a stamp (about 200: letters, digits, signs,
silhouettes) as a mask in the palette colour, ignoring the image's own colours (some are
white), so here it is drawn in black, Tux Paint's default colour, through its alpha. Ignored: sounds
(`<stamp>.ogg`, `<stamp>_desc_<locale>.ogg|.wav`) and `<stamp>_mirror.png` (a hand-drawn
mirrored variant of `<stamp>`, not a stamp of its own).

A stamp is kept when it has a PNG image and an English line. Skipped, and counted in the
build's log line and in `info.metadata['skipped']`: stamps with only an SVG image (no SVG
renderer among mmjax's dependencies), images without a `.txt` or whose `.txt` has no English
line, and images with no opaque pixel. Mirrored/flipped variants are left out uncounted.

Each example: `image` uint8 [64, 64, 3] (the stamp alpha-composited on white, cropped to its
bounding box, padded to a square and resized: `builder.to_square`), `caption` (the English
sentence, whitespace normalised, e.g. 'A great blue heron.'), `category` (the first directory
under stamps/, e.g. 'animals'), `path` (e.g. 'animals/birds/heron_greatblue.png') and `label`
int64 (the stamp's index in the sorted list of kept stamp paths, unique per stamp).

Splits `train` (~85%) and `test` (~15%) partition the stamps, seeded and deterministic. So
that image-text retrieval on `test` is well posed, every `test` caption is unique: stamps
whose caption (compared case- and punctuation-insensitively) is shared with another stamp,
like the six 'A flower.' stamps, all go to `train`; `test` is a seeded draw from the rest.
`info.metadata` stores `categories` (sorted names) and `skipped` ({reason: count}).
"""

import collections
import dataclasses
import os
import re

from absl import logging
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from mmjax.data import builder

STAMPS_DIR = '/usr/share/tuxpaint/stamps'
APT_PACKAGE = 'tuxpaint-stamps-default'
TEST_FRACTION = 0.15
SPLIT_SEED = 0

# A translation line in a stamp's .txt: `de.utf8=`, `en_GB.utf8=`, `ca@valencia.utf8=`, ...
_TRANSLATION = re.compile(r'^[A-Za-z]{2,3}(_[A-Za-z]{2})?(@\w+)?\.utf8=')
# Pre-drawn alternatives Tux Paint shows when a stamp is mirrored or flipped.
_VARIANT_SUFFIXES = ('_mirror_flip', '_mirror', '_flip')


@dataclasses.dataclass(frozen=True)
class Stamp:
  path: str  # Relative to the stamps directory, e.g. 'animals/birds/owl.png'.
  category: str  # The first directory of `path`, e.g. 'animals'.
  caption: str  # The English description, whitespace normalised.
  colorable: bool = False  # Drawn by Tux Paint in the palette colour: only its alpha counts.


def available() -> bool:
  """Whether the Tux Paint stamps are installed (so the dataset can be built)."""
  return os.path.isdir(STAMPS_DIR)


def english_caption(text: str) -> str | None:
  """The English line of a stamp's .txt contents, whitespace normalised; None if it has none.

  The English line is the first line when it is not a `<locale>.utf8=` translation.
  """
  lines = text.lstrip('\ufeff').splitlines()
  if not lines or _TRANSLATION.match(lines[0]):
    return None
  return ' '.join(lines[0].split()) or None


def _is_colorable(dat_path: str) -> bool:
  if not os.path.exists(dat_path):
    return False
  with open(dat_path, encoding='utf-8', errors='replace') as f:
    return any(line.strip().lower() == 'colorable' for line in f)


def find_stamps(stamps_dir: str | None = None) -> tuple[list[Stamp], dict[str, list[str]]]:
  """Returns (kept stamps sorted by path, {skip reason: sorted relative paths}).

  Raises FileNotFoundError, naming the apt package, if the stamps are not installed.
  """
  stamps_dir = stamps_dir or STAMPS_DIR
  if not os.path.isdir(stamps_dir):
    raise FileNotFoundError(
        f'Tux Paint stamps not found in {stamps_dir}: install the apt package {APT_PACKAGE} '
        f'(apt-get install --no-install-recommends {APT_PACKAGE}) to build this dataset.')
  files = set()
  for parent, _, names in os.walk(stamps_dir):
    files.update(os.path.relpath(os.path.join(parent, n), stamps_dir) for n in names)
  images = {os.path.splitext(f)[0] for f in files if f.endswith(('.png', '.svg'))}

  def is_variant(stem):
    return any(stem.endswith(s) and stem[:-len(s)] in images for s in _VARIANT_SUFFIXES)

  stamps, skipped = [], collections.defaultdict(list)
  for stem in sorted(images):
    if is_variant(stem):
      continue
    if stem + '.png' not in files:
      skipped['svg only'].append(stem + '.svg')
      continue
    path = stem + '.png'
    if stem + '.txt' not in files:
      skipped['no text'].append(path)
      continue
    with open(os.path.join(stamps_dir, stem + '.txt'), encoding='utf-8') as f:
      caption = english_caption(f.read())
    if caption is None:
      skipped['no English text'].append(path)
      continue
    stamps.append(Stamp(path=path, category=path.split(os.sep)[0], caption=caption,
                        colorable=_is_colorable(os.path.join(stamps_dir, stem + '.dat'))))
  stamps.sort(key=lambda s: s.path)
  texts_alone = sorted(os.path.splitext(f)[0] + '.txt' for f in files
                       if f.endswith('.txt') and os.path.splitext(f)[0] not in images)
  if texts_alone:
    skipped['text without image'] = texts_alone
  return stamps, dict(skipped)


def load_image(stamps_dir: str, stamp: Stamp) -> np.ndarray | None:
  """The stamp on white, cropped and padded square: uint8 [64, 64, 3]; None if transparent.

  A colorable stamp is drawn in black through its alpha, as Tux Paint's default colour.
  """
  with Image.open(os.path.join(stamps_dir, stamp.path)) as image:
    rgba = image.convert('RGBA')
  if stamp.colorable:
    black = Image.new('RGBA', rgba.size, 'black')
    black.putalpha(rgba.getchannel('A'))
    rgba = black
  return builder.to_square(rgba)


def caption_key(caption: str) -> str:
  """A caption's words, casefolded: 'A Silver Gull.' and 'a silver gull' are the same."""
  return ' '.join(re.findall(r'\w+', caption.casefold()))


def split_stamps(captions: list[str], test_fraction: float = TEST_FRACTION,
                 seed: int = SPLIT_SEED) -> list[str]:
  """Assigns 'train' or 'test' to each caption's stamp (same order, list of len(captions)).

  round(test_fraction * n) stamps go to 'test', drawn with `seed` among those whose caption
  no other stamp shares; the rest to 'train'.
  """
  keys = collections.Counter(caption_key(c) for c in captions)
  unique = [i for i, c in enumerate(captions) if keys[caption_key(c)] == 1]
  n_test = min(round(test_fraction * len(captions)), len(unique))
  order = np.random.default_rng(seed).permutation(len(unique))
  test = {unique[j] for j in order[:n_test]}
  return ['test' if i in test else 'train' for i in range(len(captions))]


class TuxPaint(builder.Builder):
  """Tux Paint rubber stamps captioned with their English descriptions."""

  VERSION = tfds.core.Version('1.0.0')
  FEATURES = {
      'image': tfds.features.Tensor(shape=(builder.IMAGE_SIZE, builder.IMAGE_SIZE, 3),
                                    dtype=np.uint8),
      'caption': tfds.features.Text(),
      'category': tfds.features.Text(),
      'path': tfds.features.Text(),
      'label': tfds.features.Scalar(dtype=np.int64),
  }
  HOMEPAGE = 'https://tuxpaint.org'
  LICENSE = 'GPL-2.0-or-later'
  METADATA = True

  def split_examples(self):
    stamps_dir = STAMPS_DIR
    stamps, skipped = find_stamps(stamps_dir)
    images = [load_image(stamps_dir, s) for s in stamps]
    skipped['blank image'] = [s.path for s, x in zip(stamps, images) if x is None]
    stamps, images = zip(*[(s, x) for s, x in zip(stamps, images) if x is not None])
    splits = split_stamps([s.caption for s in stamps])

    counts = {reason: len(paths) for reason, paths in sorted(skipped.items()) if paths}
    categories = sorted({s.category for s in stamps})
    self.info.metadata.update(categories=categories, skipped=counts)
    logging.info('tuxpaint: %d stamps kept (%d train, %d test) in %d categories; skipped %s',
                 len(stamps), splits.count('train'), splits.count('test'), len(categories),
                 counts)

    examples = {'train': [], 'test': []}
    for label, (stamp, image, split) in enumerate(zip(stamps, images, splits)):
      examples[split].append((stamp.path, {
          'image': image,
          'caption': stamp.caption,
          'category': stamp.category,
          'path': stamp.path,
          'label': label,
      }))
    return examples
