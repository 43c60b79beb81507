"""The data API: build the TFDS datasets, read names and eval splits, iterate train batches.

Datasets are read with `tfds` ArrayRecord data sources and grain. Images come out as float32
[..., S, S, 3] in [-1, 1]. The train iterator is a grain iterator over an infinite, seeded,
per-epoch reshuffled sequence; step t's global batch is elements [t*B, (t+1)*B) of it and host
p of P gets every P-th of those, starting at p. All randomness (order, augmentation, caption
templates) is a function of (seed, position in the sequence), so `get_state`/`set_state`
restore exactly.
"""

import functools

import grain
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from mmjax.data import captions
from mmjax.data import digits
from mmjax.data import emoji

_BUILDERS = {'digits': digits.Digits, 'emoji': emoji.Emoji}
_EVAL_SPLITS = {
    'digits': {'test': 'test'},
    'emoji': {'heldout_style/seen': 'test_seen', 'heldout_style/unseen': 'test_unseen'},
}
_CROP_AREA = {'digits': None, 'emoji': (0.8, 1.0)}  # Range of the random crop's area fraction.


def _builder(name: str, data_dir: str):
  if name not in _BUILDERS:
    raise ValueError(f'Unknown dataset {name!r}; expected one of {sorted(_BUILDERS)}')
  return _BUILDERS[name](data_dir=data_dir)


def _prepared(name: str, data_dir: str):
  builder = _builder(name, data_dir)
  if not builder.is_prepared():
    raise FileNotFoundError(f'{name!r} is not built in {data_dir}; call build() first')
  return builder


def build(name: str, data_dir: str) -> None:
  """Builds dataset `name` into `data_dir` unless it is there already."""
  builder = _builder(name, data_dir)
  if not builder.is_prepared():
    print(f'Building dataset {name!r} in {data_dir} ...', flush=True)
    tfds.disable_progress_bar()
    builder.download_and_prepare()


def class_names(name: str, data_dir: str) -> list[str]:
  """All class names; index == label."""
  if name == 'digits':
    return list(digits.NAMES)
  return list(_prepared(name, data_dir).info.metadata['names'])


def unseen_names(name: str, data_dir: str) -> list[str]:
  """Names never seen in training (a subset of `class_names`)."""
  if name == 'digits':
    return []
  return list(_prepared(name, data_dir).info.metadata['unseen_names'])


def eval_splits(name: str) -> dict[str, str]:
  """{eval name: TFDS split} for zero-shot evaluation."""
  return dict(_EVAL_SPLITS[name])


def _preprocess(image: np.ndarray, image_size: int, box=None) -> np.ndarray:
  """uint8 [h, w, 1 or 3] -> float32 [S, S, 3] in [-1, 1]; crops to `box` (x0, y0, x1, y1)."""
  pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).convert('RGB')
  pil = pil.resize((image_size, image_size), Image.Resampling.BILINEAR, box=box)
  return np.asarray(pil, np.float32) / 127.5 - 1


def _random_box(size: int, area: tuple[float, float], rng: np.random.Generator):
  """A random square crop box covering a fraction in `area` of a [size, size] image."""
  side = size * np.sqrt(rng.uniform(*area))
  x0, y0 = rng.uniform(0, size - side, 2)
  return (x0, y0, x0 + side, y0 + side)


def load_eval(name: str, split: str, data_dir: str, image_size: int) -> dict:
  """The whole split: {'image': float32 [N, S, S, 3] in [-1, 1], 'label': int32 [N]}."""
  source = _prepared(name, data_dir).as_data_source(split)
  examples = [source[i] for i in range(len(source))]
  return {
      'image': np.stack([_preprocess(x['image'], image_size) for x in examples]),
      'label': np.array([x['label'] for x in examples], np.int32),
  }


def _train_example(index, rng, *, source, name, tokenizer, image_size, max_text_len, augment):
  """Example `index` of the train split -> {'image', 'text', 'example_id'}, randomised by `rng`."""
  x = source[index]
  area = _CROP_AREA[name] if augment else None
  box = _random_box(x['image'].shape[0], area, rng) if area else None
  caption = captions.random_caption(name, x['name'].decode(), rng)
  return {
      'image': _preprocess(x['image'], image_size, box),
      'text': tokenizer.encode([caption], max_text_len)[0],
      'example_id': np.int32(index),
  }


def train_iterator(name: str, data_dir: str, *, tokenizer, image_size: int, max_text_len: int,
                   global_batch_size: int, seed: int, process_index: int = 0,
                   process_count: int = 1, worker_count: int = 0, augment: bool = True):
  """Infinite grain iterator of this host's batches.

  Each element: {'image': float32 [b, S, S, 3] in [-1, 1], 'text': int32 [b, max_text_len],
  'example_id': int32 [b]} with b = global_batch_size // process_count. Supports
  `get_state()`/`set_state()` and `grain.checkpoint.CheckpointSave/Restore`.
  """
  if global_batch_size % process_count:
    raise ValueError(f'global_batch_size={global_batch_size} is not divisible by '
                     f'process_count={process_count}')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} not in [0, {process_count})')
  local_batch_size = global_batch_size // process_count
  source = _prepared(name, data_dir).as_data_source('train')
  example = functools.partial(
      _train_example, source=source, name=name, tokenizer=tokenizer, image_size=image_size,
      max_text_len=max_text_len, augment=augment)
  ds = grain.MapDataset.range(len(source)).seed(seed).shuffle().repeat()
  ds = ds.random_map(example)  # The rng depends on (seed, position): augmentations resume exactly.
  ds = ds[process_index::process_count].batch(local_batch_size, drop_remainder=True)
  # Batch before `to_iter_dataset`: worker processes then split whole batches, so the
  # sequence of batches is the same for any `worker_count`.
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=4, prefetch_buffer_size=4))
  if worker_count:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return iter(ds)
