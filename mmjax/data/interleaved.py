"""Interleaved image-text sequences for Flamingo, built from the emoji data.

A training sequence holds K (image, caption) chunks of emoji `train` examples (the training
styles), right padded to L = max_len:

  [BOS] <image> 'an emoji of <name>.' [EOC] <image> 'an emoji of <name>.' [EOC] ... [PAD]...

As on web pages, a sequence may show the same thing twice: with probability `repeat_prob`,
chunk j > 0 names a thing of an earlier chunk (one of them, uniformly) with another picture of
it (a drawing style not yet used in the sequence when the name has one left; else another
random crop of the same drawing). A model names a repeat best by matching the picture to the
earlier one and copying its name: what few-shot prompting asks of it.

Ids are `instruct.ByteLMTokenizer`'s: `<image>` is its IMAGE_ID (259), the end of chunk EOC
its EOS (258). The loss is on the caption tokens and the EOC after each (targets that are
`<image>`, BOS or pad have weight 0). A sequence longer than L is cut at L; the images whose
`<image>` token was cut are still in the batch but no text token sees them.

Few-shot eval rows (`load_fewshot`) rank candidate names. The queries are images of the
held-out style; the demonstrations are labelled drawings of the other styles, the support
set. Two kinds of names (`names`, `FEWSHOT_SPLITS`):
  'seen'    queries of `test_seen`, support `train`: names the model was trained on;
  'unseen'  queries of `test_unseen`, support `support_unseen`: new names, never trained on
            (neither the vision tower nor the LM saw them), known only from the prompt.
For each query and each of C candidate names (the right one and C - 1 other names of the
support set), a row

  [BOS] (<image> 'an emoji of <demo name>.' [EOC]) * shots <image> 'an emoji of <candidate>.'

weighted on ' <candidate>.' only; the demonstrations are the same for all C rows of a query:
with `demonstrations='candidates'` (the default, as Flamingo's few-shot classification shows
examples of the task's labels) k distinct names drawn from the query's C candidates, so the
right name is among them with probability k / C; with 'other_names', k random support names
other than the query's (they show only the format). Each demonstration's picture is a random
support drawing of its name. `fewshot_queries` and `fewshot_split` build the same rows for
demonstrations chosen elsewhere (`mmjax.evals.fewshot.RetrievedDemonstrations`).

The train iterator is as `instruct.train_iterator`: everything random is a function of (seed,
position in the stream), host p of P gets the p-th contiguous block of each global batch, and
`get_state`/`set_state` restore exactly.
"""

import dataclasses
import functools
import zlib
from typing import Callable

import grain
import numpy as np

from mmjax.data import instruct
from mmjax.data import pipeline
from mmjax.data.tokenizer import BOS_ID, PAD_ID

EOC_ID = instruct.ByteLMTokenizer.eos_id
CAPTION_PREFIX = 'an emoji of'
TRAIN_SPLIT = 'train'
# Few-shot names -> (query split: the held-out style, support split: the demonstrations').
FEWSHOT_SPLITS = {'seen': ('test_seen', 'train'), 'unseen': ('test_unseen', 'support_unseen')}


# Where a cue digit stands in a chunk (`_chunks`).
CUE_PLACES = ('image', 'name')


def _check_cue_place(cue_at: str):
  if cue_at not in CUE_PLACES:
    raise ValueError(f'cue_at={cue_at!r}: use one of {CUE_PLACES}')


def _caption_parts(name: str, cue=None, cue_at: str = 'image') -> list[tuple[str, bool]]:
  """A chunk's text as (text, in the loss) parts, the name (and the space before it) last.
  Without a `cue`: `an emoji of <name>.`; with one, by `cue_at`:
    'image'  `<cue> an emoji of <name>.`, the cue and its space not in the loss;
    'name'   `an emoji of <cue><name>.`, the cue not in the loss: the name's first byte
             follows the cue, so an LM names a repeat by the plain induction of a token's
             successor (find the earlier cue, copy what came after it)."""
  if cue is None:
    return [(CAPTION_PREFIX, True), (f' {name}.', True)]
  if cue_at == 'image':
    return [(f'{cue} ', False), (CAPTION_PREFIX, True), (f' {name}.', True)]
  return [(f'{CAPTION_PREFIX} ', True), (cue, False), (f'{name}.', True)]


def _chunks(tokenizer, names, cues=None, cue_at: str = 'image'
            ) -> tuple[np.ndarray, np.ndarray]:
  """(ids, is_text): [BOS] then `<image> caption [EOC]` per name; is_text marks caption + EOC.
  With `cues` (one string per name, see `with_cues`) each caption carries its cue at
  `cue_at` (`_caption_parts`), the cue unmarked."""
  _check_cue_place(cue_at)
  ids, is_text = [np.array([BOS_ID])], [np.array([False])]
  for j, name in enumerate(names):
    parts = _caption_parts(name, None if cues is None else cues[j], cue_at)
    encoded = [(tokenizer.encode_text(text), marked) for text, marked in parts]
    ids.append(np.concatenate([[tokenizer.image_id]] + [e for e, _ in encoded] + [[EOC_ID]]))
    is_text.append(np.concatenate([[False]] + [np.full(len(e), m) for e, m in encoded]
                                  + [[True]]))
  return np.concatenate(ids).astype(np.int32), np.concatenate(is_text)


def _row(ids, weighted, max_len: int) -> dict[str, np.ndarray]:
  """tokens, targets int32 [L] (targets: tokens shifted left, pad last) and loss_weights
  float32 [L] (1 where the target is a `weighted` token) of `ids [n]`, cut or padded to L."""
  ids, weighted = ids[:max_len], weighted[:max_len]
  tokens = np.full(max_len, PAD_ID, np.int32)
  tokens[:len(ids)] = ids
  loss_weights = np.zeros(max_len, np.float32)
  loss_weights[:len(ids) - 1] = weighted[1:]
  targets = np.append(tokens[1:], PAD_ID).astype(np.int32)
  return dict(tokens=tokens, targets=targets, loss_weights=loss_weights)


def sequence(tokenizer, names, max_len: int, cues=None,
             cue_at: str = 'image') -> dict[str, np.ndarray]:
  """The training row of the chunks of `names` (and `cues` at `cue_at`, see `_chunks`):
  tokens, targets int32 [L], loss_weights float32 [L] (1 on caption and EOC targets)."""
  return _row(*_chunks(tokenizer, names, cues, cue_at), max_len)


def examples_by_name(names) -> dict[str, np.ndarray]:
  """{name: int [m] indices of its examples (one per drawing style)} of a split's `names`."""
  by_name = {}
  for index, name in enumerate(names):
    by_name.setdefault(name, []).append(index)
  return {name: np.array(indices) for name, indices in by_name.items()}


def with_repeats(indices, rng, *, names, by_name, repeat_prob: float,
                 last_only: bool = False, same_drawing_prob: float = 0.0) -> np.ndarray:
  """`indices [K]` with each chunk j > 0 (only the last with `last_only`) replaced, with
  probability `repeat_prob`, by another example of the name of a uniformly chosen earlier
  chunk (a drawing not used yet in the sequence if the name has one, else the same example
  again); with probability `same_drawing_prob` a repeat is the earlier chunk's own example
  (the same drawing: the easiest match there is, a curriculum for the cross-attention).

  With `last_only` the K - 1 chunks before the last are (nearly always) distinct things, as
  the demonstrations of a few-shot prompt, so naming a repeat asks which of them it shows;
  repeats anywhere make most of them repeats of the only or the same earlier thing."""
  indices = np.array(indices)
  for j in range(len(indices) - 1 if last_only else 1, len(indices)):
    if rng.random() < repeat_prob:
      earlier = indices[rng.integers(j)]
      if same_drawing_prob and rng.random() < same_drawing_prob:  # no draw when 0
        indices[j] = earlier
        continue
      same = by_name[names[int(earlier)]]
      unused = np.setdiff1d(same, indices[:j])
      indices[j] = rng.choice(unused if len(unused) else same)
  return indices


_CONSONANTS, _VOWELS = 'bcdfghjklmnprstvwz', 'aeiou'


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


_CUE_DIGITS = '0123456789'


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
  `experiments/flamingo_picture_cues.py`), else a hash of the name; and none (None) on a
  chunk that repeats an earlier thing: there only the picture can say which earlier chunk it
  shows.

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


CUE_DIGITS_KINDS = ('per_sequence', 'per_thing')


def _train_example(indices, rng, *, source, names, by_name, tokenizer, image_size, max_len,
                   augment, repeat_prob, made_up_prob, cue_prob=0.0, cue_at='image',
                   cue_digits='per_sequence', thing_digits=None, repeat_last_only=False,
                   same_drawing_prob=0.0):
  """The sequence of the K train examples `indices [K]` (some replaced by repeats, see
  `with_repeats`; with probability `made_up_prob` every name made up, see
  `with_made_up_names`; with probability `cue_prob` cued at `cue_at` by `cue_digits`, see
  `with_cues`, `thing_cues` and `_chunks`), images randomised by `rng`."""
  indices = with_repeats(indices, rng, names=names, by_name=by_name, repeat_prob=repeat_prob,
                         last_only=repeat_last_only, same_drawing_prob=same_drawing_prob)
  images = np.stack([instruct.prepare_image(source[int(i)]['image'], 'emoji', image_size,
                                     rng if augment else None) for i in indices])
  thing_names = chunk_names = [names[int(i)] for i in indices]
  if made_up_prob and rng.random() < made_up_prob:  # no draw when 0: streams stay as before
    chunk_names = with_made_up_names(chunk_names, rng)
  cues = None
  if cue_prob and rng.random() < cue_prob:
    cues = (with_cues(chunk_names, rng) if cue_digits == 'per_sequence'
            else thing_cues(thing_names, thing_digits))
  return dict(sequence(tokenizer, chunk_names, max_len, cues, cue_at), image=images,
              example_id=np.asarray(indices, np.int32))


def train_iterator(data_dir: str, *, tokenizer, images_per_sequence: int, max_len: int,
                   image_size: int, global_batch_size: int, seed: int, process_index: int = 0,
                   process_count: int = 1, worker_count: int = 0, augment: bool = True,
                   repeat_prob: float = 0.0, made_up_prob: float = 0.0, cue_prob: float = 0.0,
                   cue_at: str = 'image', cue_digits: str = 'per_sequence',
                   thing_digits: dict[str, str] | None = None, repeat_last_only: bool = False,
                   same_drawing_prob: float = 0.0):
  """Infinite grain iterator of this host's batches of interleaved sequences.

  The emoji dataset must be built (`instruct.build(data_dir, ['emoji_name'])`). Each element,
  b = global_batch_size // process_count, K = images_per_sequence: image float32
  [b, K, S, S, 3] in [-1, 1] (random crop and colour jitter as `pipeline.train_iterator`),
  tokens and targets int32 [b, L], loss_weights float32 [b, L] (see `sequence`) and
  example_id int32 [b, K] (indices in the emoji train split). The K examples of a sequence
  are consecutive elements of an endlessly reshuffled stream of the split, some replaced by
  repeats of earlier chunks' names (`repeat_prob`; only the last chunk with
  `repeat_last_only`; in the repeated chunk's own drawing with `same_drawing_prob`, see
  `with_repeats`). A fraction
  `made_up_prob` of the sequences name their things by made-up names (`with_made_up_names`):
  a model cannot have memorised those, so it can name a repeat only by matching its picture
  to the earlier one and copying the name from the context, the skill few-shot prompting with
  new names (`names='unseen'` below) asks for. A fraction `cue_prob` of the sequences carry
  a cue digit per thing after each `<image>` or, `cue_at='name'`, before each name
  (`with_cues`, `_chunks`): the text then says which earlier chunk a repeat shows (for the
  LM stage; the few-shot prompts have no cues). `cue_digits='per_thing'` makes each digit a
  function of the thing (`thing_digits`, else a hash of its name) and leaves repeats uncued
  (`thing_cues`: for the `xattn` stage).
  """
  _check_cue_place(cue_at)
  if cue_digits not in CUE_DIGITS_KINDS:
    raise ValueError(f'cue_digits={cue_digits!r}: use one of {CUE_DIGITS_KINDS}')
  for name, p in (('repeat_prob', repeat_prob), ('made_up_prob', made_up_prob),
                  ('cue_prob', cue_prob), ('same_drawing_prob', same_drawing_prob)):
    if not 0.0 <= p <= 1.0:
      raise ValueError(f'{name}={p} is not in [0, 1]')
  source = instruct.split_source('emoji', TRAIN_SPLIT, data_dir)
  names = [x['name'] for x in instruct.split_texts('emoji', TRAIN_SPLIT, data_dir)]
  if thing_digits is not None and set(names) - set(thing_digits):
    missing = sorted(set(names) - set(thing_digits))
    raise ValueError(f'thing_digits has no digit for {len(missing)} train names, e.g. '
                     f'{missing[:3]}')
  shuffle_seed, map_seed = np.random.SeedSequence([seed, 7]).generate_state(2)
  example = functools.partial(_train_example, source=source, names=names,
                              by_name=examples_by_name(names), tokenizer=tokenizer,
                              image_size=image_size, max_len=max_len, augment=augment,
                              repeat_prob=repeat_prob, made_up_prob=made_up_prob,
                              cue_prob=cue_prob, cue_at=cue_at, cue_digits=cue_digits,
                              thing_digits=thing_digits, repeat_last_only=repeat_last_only,
                              same_drawing_prob=same_drawing_prob)
  ds = (grain.MapDataset.range(len(source)).shuffle(seed=int(shuffle_seed)).repeat()
        .batch(images_per_sequence, drop_remainder=True)
        .random_map(example, seed=int(map_seed)))
  return pipeline.host_batches(ds, global_batch_size=global_batch_size,
                               process_index=process_index, process_count=process_count,
                               worker_count=worker_count)


@dataclasses.dataclass
class FewShotQueries:
  """n query images of the held-out style, their C candidate names each, and the support set
  (labelled drawings of the other styles) that demonstrations come from.

  images float32 [n, S, S, 3]; answer: n names; candidates: n lists of C names (the answer at
  `answer_index` int [n]); example_id int32 [n] (index in the query split); support_names:
  the name of every support example; support_image(i): support example i as float32
  [S, S, 3].
  """
  images: np.ndarray
  answer: list
  candidates: list
  answer_index: np.ndarray
  example_id: np.ndarray
  support_names: list
  support_image: Callable[[int], np.ndarray]

  @functools.cached_property
  def by_name(self) -> dict[str, np.ndarray]:
    return examples_by_name(self.support_names)

  def candidate_examples(self, q: int) -> np.ndarray:
    """int [m]: the support examples (every drawing) of query q's candidates."""
    return np.concatenate([self.by_name[name] for name in self.candidates[q]])


def fewshot_queries(data_dir: str, *, num_queries: int, num_candidates: int, image_size: int,
                    seed: int = 0, names: str = 'seen') -> FewShotQueries:
  """The first n = num_queries of a seeded shuffle of the query split of `names` ('seen' or
  'unseen', see the module docstring), each with the right name and C - 1 other names of the
  support split, in a random order (the emoji data built)."""
  if names not in FEWSHOT_SPLITS:
    raise ValueError(f'names={names!r}: use one of {sorted(FEWSHOT_SPLITS)}')
  query_split, support_split = FEWSHOT_SPLITS[names]
  support_names = [x['name'] for x in instruct.split_texts('emoji', support_split, data_dir)]
  query_names = [x['name'] for x in instruct.split_texts('emoji', query_split, data_dir)]
  vocabulary = sorted(set(support_names))
  if num_candidates > len(vocabulary):
    raise ValueError(f'num_candidates={num_candidates}: only {len(vocabulary)} names')
  missing = sorted(set(query_names) - set(vocabulary))
  if missing:
    raise ValueError(f'{len(missing)} {query_split} names have no {support_split} drawing, '
                     f'e.g. {missing[:3]}')
  rng = np.random.default_rng(seed)
  queries = rng.permutation(len(query_names))[:num_queries]
  answer_index = rng.integers(num_candidates, size=len(queries))
  candidates = []
  for query, right in zip(queries, answer_index):
    others = [n for n in rng.choice(vocabulary, num_candidates, replace=False)
              if n != query_names[query]][:num_candidates - 1]
    candidates.append(others[:right] + [query_names[query]] + others[right:])
  support_source = instruct.split_source('emoji', support_split, data_dir)
  query_source = instruct.split_source('emoji', query_split, data_dir)
  image = lambda source, i: instruct.prepare_image(source[int(i)]['image'], 'emoji', image_size)
  return FewShotQueries(
      images=np.stack([image(query_source, q) for q in queries]),
      answer=[query_names[q] for q in queries], candidates=candidates,
      answer_index=answer_index, example_id=queries.astype(np.int32),
      support_names=support_names, support_image=functools.partial(image, support_source))


def fewshot_split(tokenizer, queries: FewShotQueries, demos, cued: bool = False,
                  cue_at: str = 'image') -> dict:
  """Ranking rows of every query with its demonstrations `demos` (n lists of k support
  example indices, in prompt order); the keys of `load_fewshot`'s splits. `cued`: the chunks
  carry cues (`with_cues`; the query's is its answer's), so the text alone says which
  demonstration shows the answer: what a text-only LM can do once told which one to copy;
  `cue_at`: where the cues stand (`_caption_parts`). The weighted answer is the caption's
  last part: ' <candidate>.', or '<candidate>.' after the query's cue with `cue_at='name'`."""
  ids, weighted, images, demo_names = [], [], [], []
  for q, names in enumerate(queries.candidates):
    demo_names.append([queries.support_names[d] for d in demos[q]])
    demo_cues = query_cue = None
    if cued:
      *demo_cues, query_cue = with_cues(demo_names[-1] + [queries.answer[q]],
                                        np.random.default_rng([q, 11]))
    context, _ = _chunks(tokenizer, demo_names[-1], demo_cues, cue_at)
    # The query's caption up to its name; each candidate's name part completes it.
    query_text = ''.join(text for text, _ in _caption_parts('', query_cue, cue_at)[:-1])
    prompt = np.concatenate([context, [tokenizer.image_id], tokenizer.encode_text(query_text)])
    row_images = np.stack([queries.support_image(d) for d in demos[q]] + [queries.images[q]])
    for name in names:
      answer = tokenizer.encode_text(_caption_parts(name, query_cue, cue_at)[-1][0])
      ids.append(np.concatenate([prompt, answer]).astype(np.int32))
      weighted.append(np.concatenate([np.zeros(len(prompt), bool), np.ones(len(answer), bool)]))
      images.append(row_images)
  length = -(-max(len(x) for x in ids) // 8) * 8
  rows = [_row(x, w, length) for x, w in zip(ids, weighted)]
  split = {key: np.stack([row[key] for row in rows]) for key in rows[0]}
  split.update(image=np.stack(images), answer_index=queries.answer_index,
               candidates=queries.candidates, answer=queries.answer,
               example_id=queries.example_id, demonstrations=demo_names,
               answer_shown=np.array([a in d for a, d in zip(queries.answer, demo_names)]))
  return split


def load_fewshot(data_dir: str, *, tokenizer, shots, num_queries: int, num_candidates: int,
                 image_size: int, seed: int = 0, demonstrations: str = 'candidates',
                 names: str = 'seen', cued: bool = False,
                 cue_at: str = 'image') -> dict[int, dict]:
  """Ranking rows for each number of demonstrations in `shots` (the emoji data built).

  The same queries (`fewshot_queries`) serve every k in `shots`. Returns {k: {'image':
  float32 [n * C, k + 1, S, S, 3] (demonstrations then the query), 'tokens', 'targets' int32
  [n * C, L_k], 'loss_weights' float32 [n * C, L_k] (1 on ' <candidate>.'), 'answer_index'
  int [n] (the right candidate's index in 0..C-1), 'candidates': n lists of C names,
  'answer': n names, 'example_id': int32 [n] (index in the query split), 'demonstrations': n
  lists of k names, 'answer_shown': bool [n] (the answer is a demonstration's name)}}; row
  q * C + c is query q with candidate c. L_k: the longest row, rounded up to a multiple of 8.
  `demonstrations`: 'candidates' or 'other_names'; `names`: 'seen' or 'unseen' (see the
  module docstring); `cued`, `cue_at`: see `fewshot_split`.
  """
  if demonstrations not in ('candidates', 'other_names'):
    raise ValueError(f"demonstrations={demonstrations!r}: use 'candidates' or 'other_names'")
  queries = fewshot_queries(data_dir, num_queries=num_queries, num_candidates=num_candidates,
                            image_size=image_size, seed=seed, names=names)
  by_name = queries.by_name
  splits = {}
  for k in shots:
    if demonstrations == 'candidates' and k > num_candidates:
      raise ValueError(f'{k} demonstrations from {num_candidates} candidates: at most one each')
    demo_rng = np.random.default_rng([seed, k])
    demos = []
    for answer, names in zip(queries.answer, queries.candidates):
      if demonstrations == 'candidates':
        demos.append([demo_rng.choice(by_name[name])
                      for name in demo_rng.choice(names, k, replace=False)])
      else:
        allowed = np.flatnonzero(np.array(queries.support_names) != answer)
        demos.append(demo_rng.choice(allowed, k, replace=False))
    splits[k] = fewshot_split(tokenizer, queries, demos, cued, cue_at)
  return splits
