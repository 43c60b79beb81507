"""The data API: build the TFDS datasets, read their splits, names and eval splits, iterate
train batches.

Datasets are read with `tfds` ArrayRecord data sources and grain. Images come out as float32
[..., S, S, 3] in [-1, 1] (`images`). The train iterator is a grain iterator over an infinite,
seeded, per-epoch reshuffled sequence; step t's global batch is elements [t*B, (t+1)*B) of it
and host p of P gets the p-th contiguous block of B/P of those, so the hosts' batches
concatenated in process order are the one-host batch, row for row. All randomness (order,
augmentation, caption templates) is a function of (seed, position in the sequence), so
`get_state`/`set_state` restore exactly.
"""

import fcntl
import functools
import hashlib
import os

from absl import flags
import grain
import numpy as np
import tensorflow_datasets as tfds

from mmjax.data import captions
from mmjax.data import digits
from mmjax.data import emoji
from mmjax.data import tuxpaint
from mmjax.data.images import prepare_image, preprocess

_BUILDERS = {'digits': digits.Digits, 'emoji': emoji.Emoji, 'tuxpaint': tuxpaint.TuxPaint}
DATASETS = tuple(_BUILDERS)  # the names `build` and the train iterators take
_EVAL_SPLITS = {
    'digits': {'test': 'test'},
    'emoji': {'heldout_style/seen': 'test_seen', 'heldout_style/unseen': 'test_unseen'},
}
_RETRIEVAL_SPLITS = {
    'emoji': {'heldout_style': ('test_seen', 'test_unseen')},
    'tuxpaint': {'test': ('test',)},
}


def _builder(name: str, data_dir: str):
  if name not in _BUILDERS:
    raise ValueError(f'Unknown dataset {name!r}; expected one of {sorted(_BUILDERS)}')
  return _BUILDERS[name](data_dir=data_dir)


def prepared(name: str, data_dir: str):
  builder = _builder(name, data_dir)
  if not builder.is_prepared():
    raise FileNotFoundError(f'{name!r} is not built in {data_dir}; call build() first')
  return builder


def split_source(name: str, split: str, data_dir: str):
  """The random-access grain source of a built dataset's split."""
  return prepared(name, data_dir).as_data_source(split)


@functools.lru_cache(maxsize=None)
def split_texts(name: str, split: str, data_dir: str) -> tuple[dict[str, str], ...]:
  """The text fields of each example of a built dataset's split, read once per process."""
  source = split_source(name, split, data_dir)
  return tuple({key: value.decode() for key, value in source[i].items()
                if isinstance(value, bytes)} for i in range(len(source)))


def build(name: str, data_dir: str) -> None:
  """Builds dataset `name` into `data_dir` unless it is there already.

  Several processes may call this at once (the processes of a multi-host run on one
  machine, or sharing a file system): a lock file lets one build while the others wait.
  """
  if _builder(name, data_dir).is_prepared():
    return
  os.makedirs(data_dir, exist_ok=True)
  with open(os.path.join(data_dir, f'.{name}.build.lock'), 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    builder = _builder(name, data_dir)  # Another process may have built it meanwhile.
    if not builder.is_prepared():
      print(f'Building dataset {name!r} in {data_dir} ...', flush=True)
      tfds.disable_progress_bar()
      builder.download_and_prepare()


def dataset_identity(name: str, data_dir: str) -> dict:
  """What built dataset `name` is: `{'version': builder version, 'train_sha256': hash of
  its train split's files}`. Two machines whose installed packages drew it differently
  (e.g. an apt emoji style present on one only) get different hashes."""
  builder = prepared(name, data_dir)
  digest = hashlib.sha256()
  prefix = f'{builder.name}-train.'
  for file_name in sorted(n for n in os.listdir(builder.data_dir) if n.startswith(prefix)):
    digest.update(file_name.encode())
    with open(os.path.join(builder.data_dir, file_name), 'rb') as f:
      for block in iter(lambda: f.read(1 << 20), b''):
        digest.update(block)
  return {'version': str(builder.version), 'train_sha256': digest.hexdigest()}


def class_names(name: str, data_dir: str) -> list[str]:
  """All class names; index == label."""
  if name == 'digits':
    return list(digits.NAMES)
  return list(prepared(name, data_dir).info.metadata['names'])


def unseen_names(name: str, data_dir: str) -> list[str]:
  """Names never seen in training (a subset of `class_names`)."""
  if name == 'digits':
    return []
  return list(prepared(name, data_dir).info.metadata['unseen_names'])


def eval_splits(name: str) -> dict[str, str]:
  """{eval name: TFDS split} for zero-shot evaluation."""
  if name not in _EVAL_SPLITS:
    raise ValueError(f'dataset {name!r} has no zero-shot classification splits; use one of '
                     f'{sorted(_EVAL_SPLITS)}')
  return dict(_EVAL_SPLITS[name])


def load_eval(name: str, split: str, data_dir: str, image_size: int) -> dict:
  """The whole split: {'image': float32 [N, S, S, 3] in [-1, 1], 'label': int32 [N]}."""
  examples = _examples(split_source(name, split, data_dir))
  return {
      'image': np.stack([preprocess(x['image'], image_size) for x in examples]),
      'label': np.array([x['label'] for x in examples], np.int32),
  }


def load_retrieval(name: str, data_dir: str, image_size: int) -> dict[str, dict]:
  """Image-caption pairs for retrieval, by eval split name.

  Each split: `{'image': float32 [n, S, S, 3], 'caption': list of n str, 'text_to_image':
  int32 [n]}` (one caption per image here). Emoji: the held-out style, seen and unseen
  names together, captioned `captions.RETRIEVAL_TEMPLATES['emoji']`; Tux Paint: the test
  stamps with their sentences.
  """
  if name not in _RETRIEVAL_SPLITS:
    raise ValueError(f'dataset {name!r} has no retrieval splits; use one of '
                     f'{sorted(_RETRIEVAL_SPLITS)}')
  builder = prepared(name, data_dir)
  splits = {}
  for split_name, tfds_splits in _RETRIEVAL_SPLITS[name].items():
    examples = [x for s in tfds_splits for x in _examples(builder.as_data_source(s))]
    if name == 'emoji':
      texts = [captions.RETRIEVAL_TEMPLATES[name].format(x['name'].decode()) for x in examples]
    else:
      texts = [x['caption'].decode() for x in examples]
    splits[split_name] = {
        'image': np.stack([preprocess(x['image'], image_size) for x in examples]),
        'caption': texts,
        'text_to_image': np.arange(len(examples), dtype=np.int32),
    }
  return splits


def _examples(source) -> list[dict]:
  return [source[i] for i in range(len(source))]


def _train_example(index, rng, *, source, name, tokenizer, image_size, max_text_len, augment,
                   restyle_prob):
  """Example `index` of the train split -> {'image', 'text', 'example_id'}, randomised by `rng`."""
  x = source[index]
  image = prepare_image(x['image'], name, image_size, rng if augment else None,
                        restyle_prob=restyle_prob)
  if 'caption' in x:  # A dataset of sentences (Tux Paint).
    caption = x['caption'].decode()
  else:  # A dataset of names: a caption template is drawn.
    caption = captions.random_caption(name, x['name'].decode(), rng)
  return {
      'image': image,
      'text': tokenizer.encode([caption], max_text_len)[0],
      'example_id': np.int32(index),
  }


def train_iterator(name: str, data_dir: str, *, tokenizer, image_size: int, max_text_len: int,
                   global_batch_size: int, seed: int, process_index: int = 0,
                   process_count: int = 1, worker_count: int = 0, augment: bool = True,
                   restyle_prob: float = 0.0):
  """Infinite grain iterator of this host's batches (`restyle_prob`: `images.random_jitter`).

  Each element: {'image': float32 [b, S, S, 3] in [-1, 1], 'text': int32 [b, max_text_len],
  'example_id': int32 [b]} with b = global_batch_size // process_count. Supports
  `get_state()`/`set_state()` and `grain.checkpoint.CheckpointSave/Restore`.
  """
  source = split_source(name, 'train', data_dir)
  example = functools.partial(
      _train_example, source=source, name=name, tokenizer=tokenizer, image_size=image_size,
      max_text_len=max_text_len, augment=augment, restyle_prob=restyle_prob)
  ds = grain.MapDataset.range(len(source)).seed(seed).shuffle().repeat()
  ds = ds.random_map(example)  # The rng depends on (seed, position): augmentations resume exactly.
  return host_batches(ds, global_batch_size=global_batch_size, process_index=process_index,
                      process_count=process_count, worker_count=worker_count)


def host_batches(ds, *, global_batch_size: int, process_index: int, process_count: int,
                 worker_count: int):
  """Iterator of this host's batches of the endless `grain.MapDataset` of examples `ds`.

  Lazy batches of b = global_batch_size // process_count consecutive elements; host p takes
  every P-th starting at p, i.e. the p-th block of each global batch, and computes only its
  own elements. Batching comes before `to_iter_dataset`: worker processes then split whole
  batches, so the sequence of batches is the same for any `worker_count`. The iterator
  supports `get_state()`/`set_state()` and `grain.checkpoint.CheckpointSave/Restore`.
  """
  if global_batch_size % process_count:
    raise ValueError(f'global_batch_size={global_batch_size} is not divisible by '
                     f'process_count={process_count}')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} not in [0, {process_count})')
  ds = ds.batch(global_batch_size // process_count, drop_remainder=True)
  ds = ds[process_index::process_count].to_iter_dataset(
      grain.ReadOptions(num_threads=4, prefetch_buffer_size=4))
  if worker_count:
    # grain's worker processes read absl flags; outside an absl app (a notebook, pytest)
    # nothing parsed them, and reading one would raise. Their defaults are what we want.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return iter(ds)


def _image_example(index, rng, *, source, name, image_size, augment, jitter):
  """Example `index` of the train split -> {'image', 'example_id'}, randomised by `rng`."""
  image = prepare_image(source[index]['image'], name, image_size, rng if augment else None,
                        jitter)
  return {'image': image, 'example_id': np.int32(index)}


def image_train_iterator(name: str, data_dir: str, *, image_size: int, global_batch_size: int,
                         seed: int, process_index: int = 0, process_count: int = 1,
                         worker_count: int = 0, augment: bool = True, jitter: bool = True):
  """`train_iterator` for images alone (no captions), e.g. to train an image tokenizer.

  Each element: {'image': float32 [b, S, S, 3] in [-1, 1], 'example_id': int32 [b]}, with
  the same order, host blocks and checkpointable state as `train_iterator`, and its
  augmentations (`jitter=False`: the random crop only, no colour jitter or blur).
  """
  source = split_source(name, 'train', data_dir)
  example = functools.partial(_image_example, source=source, name=name, image_size=image_size,
                              augment=augment, jitter=jitter)
  ds = grain.MapDataset.range(len(source)).seed(seed).shuffle().repeat().random_map(example)
  return host_batches(ds, global_batch_size=global_batch_size, process_index=process_index,
                      process_count=process_count, worker_count=worker_count)
