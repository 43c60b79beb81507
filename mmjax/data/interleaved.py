"""Interleaved image-text sequences for Flamingo, built from the emoji data.

A training sequence holds K (image, caption) chunks of emoji `train` examples (the training
styles), right padded to L = max_len:

  [BOS] <image> 'an emoji of <name>.' [EOC] <image> 'an emoji of <name>.' [EOC] ... [PAD]...

As on web pages, a sequence may show the same thing twice: with probability `repeat_prob`,
chunk j > 0 names a thing of an earlier chunk (one of them, uniformly) with another picture of
it (a drawing style not yet used in the sequence when the name has one left; else another
random crop of the same drawing). A model names a repeat best by matching the picture to the
earlier one and copying its name: what few-shot prompting asks of it.

Ids are `mmjax.data.tokenizers.ByteLMTokenizer`'s: `<image>` is its `image_id` (259), the end
of chunk EOC its EOS (258). A caption is a list of (text, in the loss) parts (`caption`); the
loss is on the caption tokens marked so and the EOC after each (targets that are `<image>`,
BOS or pad have weight 0). A sequence longer than L is cut at L; the images whose `<image>`
token was cut are still in the batch but no text token sees them.

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

Research curricula (which examples a sequence repeats, how its chunks are captioned) are not
written here: a `Curriculum` is the one hook, loaded from a file named by
`config.data.curriculum` (`load_curriculum`; the Flamingo ones: experiments/flamingo/).

The train iterator is as `pipeline.train_iterator`: everything random is a function of (seed,
position in the stream), host p of P gets the p-th contiguous block of each global batch, and
`get_state`/`set_state` restore exactly.
"""

import dataclasses
import functools
import importlib.util
import os
from typing import Callable

import grain
import numpy as np

from mmjax.data import pipeline
from mmjax.data.images import prepare_image
from mmjax.data.tokenizers.byte import BOS_ID, EOT_ID, PAD_ID

EOC_ID = EOT_ID  # The end of chunk: `ByteLMTokenizer`'s EOS.
CAPTION_PREFIX = 'an emoji of'
TRAIN_SPLIT = 'train'
# Few-shot names -> (query split: the held-out style, support split: the demonstrations').
FEWSHOT_SPLITS = {'seen': ('test_seen', 'train'), 'unseen': ('test_unseen', 'support_unseen')}

Caption = list[tuple[str, bool]]  # A chunk's text as (text, in the loss) parts.


def caption(name: str) -> Caption:
  """The plain caption `an emoji of <name>.`, all in the loss, the name's part (and the space
  before it) last: a few-shot prompt stops before it."""
  return [(CAPTION_PREFIX, True), (f' {name}.', True)]


def chunks(tokenizer, captions) -> tuple[np.ndarray, np.ndarray]:
  """(ids, is_text): [BOS] then `<image> caption [EOC]` per caption of `captions` (see
  `caption`); is_text marks the caption parts in the loss and each EOC."""
  ids, is_text = [np.array([BOS_ID])], [np.array([False])]
  for parts in captions:
    encoded = [(tokenizer.encode_text(text), marked) for text, marked in parts]
    ids.append(np.concatenate([[tokenizer.image_id]] + [e for e, _ in encoded] + [[EOC_ID]]))
    is_text.append(np.concatenate([[False]] + [np.full(len(e), m) for e, m in encoded]
                                  + [[True]]))
  return np.concatenate(ids).astype(np.int32), np.concatenate(is_text)


def row(ids, weighted, max_len: int) -> dict[str, np.ndarray]:
  """tokens, targets int32 [L] (targets: tokens shifted left, pad last) and loss_weights
  float32 [L] (1 where the target is a `weighted` token) of `ids [n]`, cut or padded to L."""
  ids, weighted = ids[:max_len], weighted[:max_len]
  tokens = np.full(max_len, PAD_ID, np.int32)
  tokens[:len(ids)] = ids
  loss_weights = np.zeros(max_len, np.float32)
  loss_weights[:len(ids) - 1] = weighted[1:]
  targets = np.append(tokens[1:], PAD_ID).astype(np.int32)
  return dict(tokens=tokens, targets=targets, loss_weights=loss_weights)


def captioned_sequence(tokenizer, captions, max_len: int) -> dict[str, np.ndarray]:
  """The training row of chunks with `captions`: tokens, targets int32 [L], loss_weights
  float32 [L] (1 on the targets that are caption parts in the loss or EOC)."""
  return row(*chunks(tokenizer, captions), max_len)


def sequence(tokenizer, names, max_len: int) -> dict[str, np.ndarray]:
  """`captioned_sequence` of the plain captions of `names`."""
  return captioned_sequence(tokenizer, [caption(name) for name in names], max_len)


def examples_by_name(names) -> dict[str, np.ndarray]:
  """{name: int [m] indices of its examples (one per drawing style)} of a split's `names`."""
  by_name = {}
  for index, name in enumerate(names):
    by_name.setdefault(name, []).append(index)
  return {name: np.array(indices) for name, indices in by_name.items()}


def another_drawing(earlier, used, rng, *, names, by_name):
  """An example of the thing of example `earlier`: a drawing not in `used` if it has one,
  else any of its drawings (the same again when it has one)."""
  same = by_name[names[int(earlier)]]
  unused = np.setdiff1d(same, used)
  return rng.choice(unused if len(unused) else same)


def with_repeats(indices, rng, *, names, by_name, repeat_prob: float) -> np.ndarray:
  """`indices [K]` with each chunk j > 0 replaced, with probability `repeat_prob`, by
  `another_drawing` of the thing of a uniformly chosen earlier chunk."""
  indices = np.array(indices)
  for j in range(1, len(indices)):
    if rng.random() < repeat_prob:
      indices[j] = another_drawing(indices[rng.integers(j)], indices[:j], rng, names=names,
                                   by_name=by_name)
  return indices


class Curriculum:
  """The plain format, and the one hook of a research curriculum: a curriculum file
  (`load_curriculum`) subclasses this and overrides what its sequences do differently.

    check(train_names)    raises ValueError if it cannot serve the train split's names;
    repeats(indices, rng, *, names, by_name, repeat_prob) -> int [K]: the examples the K
                          chunks show (plain: `with_repeats`);
    captions(things, rng) -> K captions (`caption`) of chunks that show `things` (the names
                          of the K examples);
    fewshot_captions(demo_names, answer, rng) -> (the demonstrations' captions, a function
                          name -> the query's caption with that name, its last part the
                          name's): few-shot rows in this curriculum's format.

  `rng` is the sequence's (or the query's) generator: `repeats` draws from it before the
  images are augmented, `captions` after. A setting that is off should draw nothing, so that
  the streams of the other settings stay as they are.
  """

  def check(self, train_names) -> None:
    del train_names  # the plain format serves any names

  def repeats(self, indices, rng, *, names, by_name, repeat_prob: float) -> np.ndarray:
    return with_repeats(indices, rng, names=names, by_name=by_name, repeat_prob=repeat_prob)

  def captions(self, things, rng) -> list[Caption]:
    del rng  # nothing random
    return [caption(name) for name in things]

  def fewshot_captions(self, demo_names, answer, rng) -> tuple[list[Caption], Callable]:
    del answer, rng  # the plain format: nothing says which demonstration is the answer
    return [caption(name) for name in demo_names], caption


def load_curriculum(spec: str) -> Curriculum:
  """`config.data.curriculum`: '' (the plain format) or 'FILE.py:ARG', whose module's
  `get_curriculum(ARG)` returns the `Curriculum` (as `configs/X.py:ARG` gives a config). A
  relative FILE is taken from the current directory, else from the repository's root."""
  if not spec:
    return Curriculum()
  path, _, arg = spec.partition(':')
  if not os.path.isabs(path) and not os.path.exists(path):
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), path)
  if not os.path.exists(path):
    raise FileNotFoundError(f'curriculum {spec!r}: no file {path}')
  module_spec = importlib.util.spec_from_file_location(
      'mmjax_curriculum_' + os.path.basename(path).removesuffix('.py'), path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_curriculum(arg)


def _train_example(indices, rng, *, source, names, by_name, tokenizer, image_size, max_len,
                   augment, repeat_prob, curriculum):
  """The sequence of the K train examples `indices [K]` (some replaced by repeats, see
  `Curriculum.repeats`), images randomised by `rng`, captioned by `Curriculum.captions`."""
  indices = curriculum.repeats(indices, rng, names=names, by_name=by_name,
                               repeat_prob=repeat_prob)
  images = np.stack([prepare_image(source[int(i)]['image'], 'emoji', image_size,
                                   rng if augment else None) for i in indices])
  captions = curriculum.captions([names[int(i)] for i in indices], rng)
  return dict(captioned_sequence(tokenizer, captions, max_len), image=images,
              example_id=np.asarray(indices, np.int32))


def train_iterator(data_dir: str, *, tokenizer, images_per_sequence: int, max_len: int,
                   image_size: int, global_batch_size: int, seed: int, process_index: int = 0,
                   process_count: int = 1, worker_count: int = 0, augment: bool = True,
                   repeat_prob: float = 0.0, curriculum: Curriculum | None = None):
  """Infinite grain iterator of this host's batches of interleaved sequences.

  The emoji dataset must be built (`pipeline.build('emoji', data_dir)`). Each element,
  b = global_batch_size // process_count, K = images_per_sequence: image float32
  [b, K, S, S, 3] in [-1, 1] (random crop and colour jitter as `pipeline.train_iterator`),
  tokens and targets int32 [b, L], loss_weights float32 [b, L] (see `captioned_sequence`) and
  example_id int32 [b, K] (indices in the emoji train split). The K examples of a sequence
  are consecutive elements of an endlessly reshuffled stream of the split, some replaced by
  repeats of earlier chunks' things (`repeat_prob`, see `with_repeats`). `curriculum`
  (default: the plain format) decides the repeats and the captions (`Curriculum`).
  """
  if not 0.0 <= repeat_prob <= 1.0:
    raise ValueError(f'repeat_prob={repeat_prob} is not in [0, 1]')
  curriculum = Curriculum() if curriculum is None else curriculum
  source = pipeline.split_source('emoji', TRAIN_SPLIT, data_dir)
  names = [x['name'] for x in pipeline.split_texts('emoji', TRAIN_SPLIT, data_dir)]
  curriculum.check(names)
  shuffle_seed, map_seed = np.random.SeedSequence([seed, 7]).generate_state(2)
  example = functools.partial(_train_example, source=source, names=names,
                              by_name=examples_by_name(names), tokenizer=tokenizer,
                              image_size=image_size, max_len=max_len, augment=augment,
                              repeat_prob=repeat_prob, curriculum=curriculum)
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
  support_names = [x['name'] for x in pipeline.split_texts('emoji', support_split, data_dir)]
  query_names = [x['name'] for x in pipeline.split_texts('emoji', query_split, data_dir)]
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
  support_source = pipeline.split_source('emoji', support_split, data_dir)
  query_source = pipeline.split_source('emoji', query_split, data_dir)
  image = lambda source, i: prepare_image(source[int(i)]['image'], 'emoji', image_size)
  return FewShotQueries(
      images=np.stack([image(query_source, q) for q in queries]),
      answer=[query_names[q] for q in queries], candidates=candidates,
      answer_index=answer_index, example_id=queries.astype(np.int32),
      support_names=support_names, support_image=functools.partial(image, support_source))


def fewshot_split(tokenizer, queries: FewShotQueries, demos,
                  curriculum: Curriculum | None = None) -> dict:
  """Ranking rows of every query with its demonstrations `demos` (n lists of k support
  example indices, in prompt order); the keys of `load_fewshot`'s splits. The chunks are
  captioned by `curriculum.fewshot_captions` (default: the plain format), with query q's
  generator `np.random.default_rng([q, 11])`. The weighted answer is the last part of the
  query's caption: ' <candidate>.' in the plain format."""
  curriculum = Curriculum() if curriculum is None else curriculum
  ids, weighted, images, demo_names = [], [], [], []
  for q, names in enumerate(queries.candidates):
    demo_names.append([queries.support_names[d] for d in demos[q]])
    demo_captions, query_caption = curriculum.fewshot_captions(
        demo_names[-1], queries.answer[q], np.random.default_rng([q, 11]))
    context, _ = chunks(tokenizer, demo_captions)
    # The query's caption up to its name; each candidate's name part completes it.
    query_text = ''.join(text for text, _ in query_caption(queries.answer[q])[:-1])
    prompt = np.concatenate([context, [tokenizer.image_id], tokenizer.encode_text(query_text)])
    row_images = np.stack([queries.support_image(d) for d in demos[q]] + [queries.images[q]])
    for name in names:
      answer = tokenizer.encode_text(query_caption(name)[-1][0])
      ids.append(np.concatenate([prompt, answer]).astype(np.int32))
      weighted.append(np.concatenate([np.zeros(len(prompt), bool), np.ones(len(answer), bool)]))
      images.append(row_images)
  length = -(-max(len(x) for x in ids) // 8) * 8
  rows = [row(x, w, length) for x, w in zip(ids, weighted)]
  split = {key: np.stack([r[key] for r in rows]) for key in rows[0]}
  split.update(image=np.stack(images), answer_index=queries.answer_index,
               candidates=queries.candidates, answer=queries.answer,
               example_id=queries.example_id, demonstrations=demo_names,
               answer_shown=np.array([a in d for a, d in zip(queries.answer, demo_names)]))
  return split


def load_fewshot(data_dir: str, *, tokenizer, shots, num_queries: int, num_candidates: int,
                 image_size: int, seed: int = 0, demonstrations: str = 'candidates',
                 names: str = 'seen', curriculum: Curriculum | None = None) -> dict[int, dict]:
  """Ranking rows for each number of demonstrations in `shots` (the emoji data built).

  The same queries (`fewshot_queries`) serve every k in `shots`. Returns {k: {'image':
  float32 [n * C, k + 1, S, S, 3] (demonstrations then the query), 'tokens', 'targets' int32
  [n * C, L_k], 'loss_weights' float32 [n * C, L_k] (1 on ' <candidate>.'), 'answer_index'
  int [n] (the right candidate's index in 0..C-1), 'candidates': n lists of C names,
  'answer': n names, 'example_id': int32 [n] (index in the query split), 'demonstrations': n
  lists of k names, 'answer_shown': bool [n] (the answer is a demonstration's name)}}; row
  q * C + c is query q with candidate c. L_k: the longest row, rounded up to a multiple of 8.
  `demonstrations`: 'candidates' or 'other_names'; `names`: 'seen' or 'unseen' (see the
  module docstring); `curriculum`: the rows' format (see `fewshot_split`).
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
    splits[k] = fewshot_split(tokenizer, queries, demos, curriculum)
  return splits
