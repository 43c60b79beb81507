r"""Flamingo curricula: training sequences that depart from the plain interleaved format
(`mmjax.data.interleaved`) to teach a model to name a repeat by matching pictures.

One config key selects one: `--config.data.curriculum=experiments/flamingo/curricula.py:OPTS`,
OPTS a comma-separated list of KEY=VALUE (the fields of `Curriculum`, each off by default):

  made_up_prob       a sequence's things get made-up names (`with_made_up_names`): a model
                     cannot have memorised those, so it names a repeat only by matching its
                     picture to the earlier one and copying the name from the context;
  cue_prob           a sequence's chunks get a cue digit per thing (`with_cues`): the text
                     says which earlier chunk a repeat shows (for the LM stage);
  cue_at             'image': the cue after `<image>`; 'name': right before the name
                     (`caption`);
  cue_digits         'per_sequence' (`with_cues`) or 'per_thing': a digit per thing, the same
                     in every sequence, repeats uncued (`thing_cues`: for the `xattn` stage);
  cue_table          per-thing digits: a JSON {name: digit} (`picture_cues.py`), else a hash
                     of the name;
  repeat_last_only   only the last chunk may repeat (the others: distinct things);
  same_drawing_prob  a repeat shows the earlier chunk's own drawing (an easy match).

  python -m mmjax.train --config configs/flamingo.py:small,lm \
      --config.data.curriculum=experiments/flamingo/curricula.py:made_up_prob=0.5 \
      --workdir workdirs/flamingo_lm_madeup

Few-shot rows under a curriculum with cues (cue_prob > 0: the `curriculum` option of a
few-shot eval, e.g. `fewshot_cued_unseen` in configs/flamingo.py) are all cued, per-sequence
digits at `cue_at`, the query with its answer's: the text says which demonstration shows the
answer, a diagnostic of an LM's copying.

The random draws are the same, in the same order, as those of the knobs these were in
`mmjax.data.interleaved` before: the streams of a run's settings did not change.
"""

import dataclasses
import functools
import json
import os
import zlib

import numpy as np

from mmjax import config_lib
from mmjax.data import interleaved

CUE_PLACES = ('image', 'name')  # Where a cue digit stands in a chunk (`caption`).
CUE_DIGITS_KINDS = ('per_sequence', 'per_thing')
_CUE_DIGITS = '0123456789'
_CONSONANTS, _VOWELS = 'bcdfghjklmnprstvwz', 'aeiou'


def _check_cue_place(cue_at: str):
  if cue_at not in CUE_PLACES:
    raise ValueError(f'cue_at={cue_at!r}: use one of {CUE_PLACES}')


def caption(name: str, cue=None, cue_at: str = 'image') -> interleaved.Caption:
  """A chunk's caption (`interleaved.caption`), the name (and the space before it) last.
  Without a `cue`: `an emoji of <name>.`; with one, by `cue_at`:
    'image'  `<cue> an emoji of <name>.`, the cue and its space not in the loss;
    'name'   `an emoji of <cue><name>.`, the cue not in the loss: the name's first byte
             follows the cue, so an LM names a repeat by the plain induction of a token's
             successor (find the earlier cue, copy what came after it)."""
  _check_cue_place(cue_at)
  if cue is None:
    return interleaved.caption(name)
  prefix = interleaved.CAPTION_PREFIX
  if cue_at == 'image':
    return [(f'{cue} ', False), (prefix, True), (f' {name}.', True)]
  return [(f'{prefix} ', True), (cue, False), (f'{name}.', True)]


def sequence(tokenizer, names, max_len: int, cues=None,
             cue_at: str = 'image') -> dict[str, np.ndarray]:
  """The training row of the chunks of `names`, with `cues` (one per name, None: uncued) at
  `cue_at` (`caption`): tokens, targets int32 [L], loss_weights float32 [L]."""
  cues = [None] * len(names) if cues is None else cues
  return interleaved.captioned_sequence(
      tokenizer, [caption(name, cue, cue_at) for name, cue in zip(names, cues)], max_len)


def with_repeats(indices, rng, *, names, by_name, repeat_prob: float, last_only: bool = False,
                 same_drawing_prob: float = 0.0) -> np.ndarray:
  """`interleaved.with_repeats` with each chunk j > 0 (only the last with `last_only`)
  repeated with probability `repeat_prob`; with probability `same_drawing_prob` a repeat is
  the earlier chunk's own example (the same drawing: the easiest match there is, a curriculum
  for the cross-attention).

  With `last_only` the K - 1 chunks before the last are (nearly always) distinct things, as
  the demonstrations of a few-shot prompt, so naming a repeat asks which of them it shows;
  repeats anywhere make most of them repeats of the only or the same earlier thing."""
  indices = np.array(indices)
  for j in range(len(indices) - 1 if last_only else 1, len(indices)):
    if rng.random() < repeat_prob:
      earlier = indices[rng.integers(j)]
      if same_drawing_prob and rng.random() < same_drawing_prob:  # no draw when 0
        indices[j] = earlier
      else:
        indices[j] = interleaved.another_drawing(earlier, indices[:j], rng, names=names,
                                                 by_name=by_name)
  return indices


def made_up_name(rng) -> str:
  """A pronounceable made-up name: 1-3 words of 1-3 (consonant, vowel) syllables each."""
  def word():
    return ''.join(rng.choice(list(_CONSONANTS)) + rng.choice(list(_VOWELS))
                   for _ in range(rng.integers(1, 4)))
  return ' '.join(word() for _ in range(rng.integers(1, 4)))


def with_made_up_names(chunk_names, rng) -> list[str]:
  """`chunk_names` with each distinct name replaced by a distinct `made_up_name`, the same
  in every chunk it names."""
  made_up = {}
  for name in chunk_names:
    while name not in made_up:
      candidate = made_up_name(rng)
      if candidate not in made_up.values():
        made_up[name] = candidate
  return [made_up[name] for name in chunk_names]


def with_cues(chunk_names, rng) -> list[str]:
  """A text cue per chunk: one digit per distinct name of `chunk_names`, distinct digits for
  distinct names, drawn at random per sequence.

  A cue says in the text alone which earlier chunk a repeat shows, as a matching picture
  does; an LM trained on cued sequences (`cue_prob`) learns to find the earlier chunk by its
  content and copy that chunk's name, the circuit that Flamingo's cross-attention can then
  drive with pictures instead of cues.
  """
  distinct = list(dict.fromkeys(chunk_names))
  if len(distinct) > len(_CUE_DIGITS):
    raise ValueError(f'{len(distinct)} distinct names, only {len(_CUE_DIGITS)} cue digits')
  digits = rng.choice(list(_CUE_DIGITS), len(distinct), replace=False)
  cue = dict(zip(distinct, digits))
  return [str(cue[name]) for name in chunk_names]


def thing_cues(chunk_names, digit_of: dict[str, str] | None = None) -> list:
  """A cue per chunk that is a function of its thing alone, the same in every sequence, so
  the picture says it: `digit_of[name]` (e.g. the thing's cluster of pictures, see
  `picture_cues.py`), else a hash of the name; and none (None) on a chunk that repeats an
  earlier thing: there only the picture can say which earlier chunk it shows.

  The cue of `cue_digits='per_thing'`: a curriculum for the `xattn` stage over an LM that
  matches by cue. Naming a repeat then asks the cross-attention for the cue of the thing in
  its own picture, where with per-sequence cues (`with_cues`) and in the plain format the
  match depends on what the cross-attention makes of the other chunks' pictures too."""
  cues, seen = [], set()
  for name in chunk_names:
    if name in seen:
      cues.append(None)
    elif digit_of is not None:
      cues.append(digit_of[name])
    else:
      cues.append(_CUE_DIGITS[zlib.crc32(name.encode()) % 10])
    seen.add(name)
  return cues


def load_cue_table(cue_table: str) -> dict[str, str] | None:
  """`cue_table`: '' (per-thing cues hash the name) or a JSON file {name: digit}."""
  if not cue_table:
    return None
  with open(os.path.expanduser(cue_table)) as f:
    table = json.load(f)
  bad = {name: digit for name, digit in table.items()
         if not (isinstance(digit, str) and len(digit) == 1 and digit.isdigit())}
  if bad:
    raise ValueError(f'cue_table={cue_table}: {len(bad)} values are not one digit, e.g. '
                     f'{list(bad.items())[:3]}')
  return table


@dataclasses.dataclass(frozen=True)
class Curriculum(interleaved.Curriculum):
  """The options of the module docstring; `thing_digits` is the loaded `cue_table`."""
  made_up_prob: float = 0.0
  cue_prob: float = 0.0
  cue_at: str = 'image'
  cue_digits: str = 'per_sequence'
  thing_digits: dict[str, str] | None = None
  repeat_last_only: bool = False
  same_drawing_prob: float = 0.0

  def __post_init__(self):
    _check_cue_place(self.cue_at)
    if self.cue_digits not in CUE_DIGITS_KINDS:
      raise ValueError(f'cue_digits={self.cue_digits!r}: use one of {CUE_DIGITS_KINDS}')
    for name in ('made_up_prob', 'cue_prob', 'same_drawing_prob'):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ValueError(f'{name}={getattr(self, name)} is not in [0, 1]')

  def check(self, train_names):
    missing = sorted(set(train_names) - set(self.thing_digits or {}))
    if self.thing_digits is not None and missing:
      raise ValueError(f'thing_digits has no digit for {len(missing)} train names, e.g. '
                       f'{missing[:3]}')

  def repeats(self, indices, rng, *, names, by_name, repeat_prob):
    return with_repeats(indices, rng, names=names, by_name=by_name, repeat_prob=repeat_prob,
                        last_only=self.repeat_last_only,
                        same_drawing_prob=self.same_drawing_prob)

  def captions(self, things, rng):
    """With probability `made_up_prob` every name made up, then with probability `cue_prob`
    cued by `cue_digits` (no draw for a probability of 0)."""
    names = things
    if self.made_up_prob and rng.random() < self.made_up_prob:
      names = with_made_up_names(names, rng)
    cues = [None] * len(names)
    if self.cue_prob and rng.random() < self.cue_prob:
      cues = (with_cues(names, rng) if self.cue_digits == 'per_sequence'
              else thing_cues(things, self.thing_digits))
    return [caption(name, cue, self.cue_at) for name, cue in zip(names, cues)]

  def fewshot_captions(self, demo_names, answer, rng):
    if not self.cue_prob:
      return super().fewshot_captions(demo_names, answer, rng)
    *demo_cues, query_cue = with_cues(list(demo_names) + [answer], rng)
    return ([caption(name, cue, self.cue_at) for name, cue in zip(demo_names, demo_cues)],
            functools.partial(caption, cue=query_cue, cue_at=self.cue_at))


def get_curriculum(arg: str) -> Curriculum:
  """'KEY=VALUE,...' (see the module docstring; '' = none on) -> a `Curriculum`."""
  options = config_lib.parse_overrides(arg.split(',') if arg else [])
  fields = [f.name for f in dataclasses.fields(Curriculum) if f.name != 'thing_digits']
  unknown = sorted(set(options) - set(fields) - {'cue_table'})
  if unknown:
    raise ValueError(f'experiments/flamingo/curricula.py: no option {unknown[0]!r}; options: '
                     f'{fields + ["cue_table"]}')
  thing_digits = load_cue_table(options.pop('cue_table', ''))
  return Curriculum(thing_digits=thing_digits, **options)
