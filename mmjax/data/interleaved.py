"""Interleaved image-text sequences for Flamingo, built from the emoji data.

A training sequence holds K (image, caption) chunks of emoji `train` examples (the training
styles), right padded to L = max_len:

  [BOS] <image> 'an emoji of <name>.' [EOC] <image> 'an emoji of <name>.' [EOC] ... [PAD]...

Ids are `instruct.ByteLMTokenizer`'s: `<image>` is its IMAGE_ID (259), the end of chunk EOC
its EOS (258). The loss is on the caption tokens and the EOC after each (targets that are
`<image>`, BOS or pad have weight 0). A sequence longer than L is cut at L; the images whose
`<image>` token was cut are still in the batch but no text token sees them.

Few-shot eval rows (`load_fewshot`) rank candidate names: for each query image of the held-out
style (`test_seen`: names seen in training) and each of C candidate names (the right one and
C - 1 other training names), a row

  [BOS] (<image> 'an emoji of <demo name>.' [EOC]) * shots <image> 'an emoji of <candidate>.'

weighted on ' <candidate>.' only; the demonstrations are random training examples of other
names than the query's, the same for all C rows of a query.

The train iterator is as `instruct.train_iterator`: everything random is a function of (seed,
position in the stream), host p of P gets the p-th contiguous block of each global batch, and
`get_state`/`set_state` restore exactly.
"""

import functools

import grain
import numpy as np

from mmjax.data import instruct
from mmjax.data.tokenizer import BOS_ID, PAD_ID

EOC_ID = instruct.ByteLMTokenizer.eos_id
CAPTION_PREFIX = 'an emoji of'
TRAIN_SPLIT, FEWSHOT_SPLIT = 'train', 'test_seen'


def caption(name: str) -> str:
  return f'{CAPTION_PREFIX} {name}.'


def _chunks(tokenizer, names) -> tuple[np.ndarray, np.ndarray]:
  """(ids, is_text): [BOS] then `<image> caption [EOC]` per name; is_text marks caption + EOC."""
  ids, is_text = [np.array([BOS_ID])], [np.array([False])]
  for name in names:
    text = tokenizer.encode_text(caption(name))
    ids.append(np.concatenate([[tokenizer.image_id], text, [EOC_ID]]))
    is_text.append(np.concatenate([[False], np.ones(len(text) + 1, bool)]))
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


def sequence(tokenizer, names, max_len: int) -> dict[str, np.ndarray]:
  """The training row of the chunks of `names`: tokens, targets int32 [L], loss_weights
  float32 [L] (1 on caption and EOC targets)."""
  return _row(*_chunks(tokenizer, names), max_len)


def _train_example(indices, rng, *, source, names, tokenizer, image_size, max_len, augment):
  """The sequence of the K train examples `indices [K]`, images randomised by `rng`."""
  images = np.stack([instruct._image(source[int(i)]['image'], 'emoji', image_size,
                                     rng if augment else None) for i in indices])
  return dict(sequence(tokenizer, [names[int(i)] for i in indices], max_len), image=images,
              example_id=np.asarray(indices, np.int32))


def train_iterator(data_dir: str, *, tokenizer, images_per_sequence: int, max_len: int,
                   image_size: int, global_batch_size: int, seed: int, process_index: int = 0,
                   process_count: int = 1, worker_count: int = 0, augment: bool = True):
  """Infinite grain iterator of this host's batches of interleaved sequences.

  The emoji dataset must be built (`instruct.build(data_dir, ['emoji_name'])`). Each element,
  b = global_batch_size // process_count, K = images_per_sequence: image float32
  [b, K, S, S, 3] in [-1, 1] (random crop and colour jitter as `pipeline.train_iterator`),
  tokens and targets int32 [b, L], loss_weights float32 [b, L] (see `sequence`) and
  example_id int32 [b, K] (indices in the emoji train split). The K examples of a sequence
  are consecutive elements of an endlessly reshuffled stream of the split.
  """
  if global_batch_size % process_count:
    raise ValueError(f'global_batch_size={global_batch_size} is not divisible by '
                     f'process_count={process_count}')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} not in [0, {process_count})')
  source = instruct._source('emoji', TRAIN_SPLIT, data_dir)
  names = [x['name'] for x in instruct._texts('emoji', TRAIN_SPLIT, data_dir)]
  shuffle_seed, map_seed = np.random.SeedSequence([seed, 7]).generate_state(2)
  example = functools.partial(_train_example, source=source, names=names, tokenizer=tokenizer,
                              image_size=image_size, max_len=max_len, augment=augment)
  ds = (grain.MapDataset.range(len(source)).shuffle(seed=int(shuffle_seed)).repeat()
        .batch(images_per_sequence, drop_remainder=True)
        .random_map(example, seed=int(map_seed)))
  # Host p takes every P-th batch of b consecutive elements: the p-th block of each global batch.
  ds = ds.batch(global_batch_size // process_count, drop_remainder=True)
  ds = ds[process_index::process_count].to_iter_dataset(
      grain.ReadOptions(num_threads=4, prefetch_buffer_size=4))
  if worker_count:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return iter(ds)


def load_fewshot(data_dir: str, *, tokenizer, shots, num_queries: int, num_candidates: int,
                 image_size: int, seed: int = 0) -> dict[int, dict]:
  """Ranking rows for each number of demonstrations in `shots` (the emoji data built).

  The same n = num_queries query images (the first n of a seeded shuffle of `test_seen`) and
  C = num_candidates candidates per query serve every k in `shots`. Returns {k: {'image':
  float32 [n * C, k + 1, S, S, 3] (demonstrations then the query), 'tokens', 'targets' int32
  [n * C, L_k], 'loss_weights' float32 [n * C, L_k] (1 on ' <candidate>.'), 'answer_index'
  int [n] (the right candidate's index in 0..C-1), 'candidates': n lists of C names,
  'answer': n names, 'example_id': int32 [n] (index in `test_seen`)}}; row q * C + c is
  query q with candidate c. L_k: the longest row, rounded up to a multiple of 8.
  """
  train_names = [x['name'] for x in instruct._texts('emoji', TRAIN_SPLIT, data_dir)]
  query_names = [x['name'] for x in instruct._texts('emoji', FEWSHOT_SPLIT, data_dir)]
  vocabulary = sorted(set(train_names))
  if num_candidates > len(vocabulary):
    raise ValueError(f'num_candidates={num_candidates}: only {len(vocabulary)} names')
  rng = np.random.default_rng(seed)
  queries = rng.permutation(len(query_names))[:num_queries]
  answer_index = rng.integers(num_candidates, size=len(queries))
  candidates = []
  for query, right in zip(queries, answer_index):
    others = [n for n in rng.choice(vocabulary, num_candidates, replace=False)
              if n != query_names[query]][:num_candidates - 1]
    candidates.append(others[:right] + [query_names[query]] + others[right:])

  train_source = instruct._source('emoji', TRAIN_SPLIT, data_dir)
  query_source = instruct._source('emoji', FEWSHOT_SPLIT, data_dir)
  image = lambda source, i: instruct._image(source[int(i)]['image'], 'emoji', image_size)
  query_images = [image(query_source, q) for q in queries]
  splits = {}
  for k in shots:
    demo_rng = np.random.default_rng([seed, k])
    ids, weighted, images = [], [], []
    for query, names, query_image in zip(queries, candidates, query_images):
      allowed = np.flatnonzero(np.array(train_names) != query_names[query])
      demos = demo_rng.choice(allowed, k, replace=False)
      context, _ = _chunks(tokenizer, [train_names[d] for d in demos])
      prompt = np.concatenate([context, [tokenizer.image_id],
                               tokenizer.encode_text(CAPTION_PREFIX)])
      row_images = np.stack([image(train_source, d) for d in demos] + [query_image])
      for name in names:
        answer = tokenizer.encode_text(f' {name}.')
        ids.append(np.concatenate([prompt, answer]).astype(np.int32))
        weighted.append(np.concatenate([np.zeros(len(prompt), bool), np.ones(len(answer), bool)]))
        images.append(row_images)
    length = -(-max(len(x) for x in ids) // 8) * 8
    rows = [_row(x, w, length) for x, w in zip(ids, weighted)]
    splits[k] = {key: np.stack([row[key] for row in rows]) for key in rows[0]}
    splits[k].update(image=np.stack(images), answer_index=answer_index, candidates=candidates,
                     answer=[query_names[q] for q in queries],
                     example_id=queries.astype(np.int32))
  return splits
