"""Zero-shot classification with a dual encoder (CLIP's evaluation).

Each class name is written into every prompt template ("an emoji of {}."); the text
embeddings of a class are averaged over templates and renormalised (the template
ensemble). An image is classified by its most similar class embedding; top-1 and
top-5 accuracy are reported per split.
"""

import math

import jax
import numpy as np

from mmjax import sharding


class ZeroShotEvaluator:
  """`run(params)` -> `{'<split>/top1': ..., '<split>/top5': ...}`.

  encode_image(params, images [b, h, w, 3]) and encode_text(params, token_ids [b, l])
  return unit-norm embeddings `[b, d]`; splits maps a name to
  `{'image': [n, h, w, 3], 'label': [n]}` with labels indexing `class_names`.
  """

  def __init__(self, *, encode_image, encode_text, tokenizer, max_text_len, class_names,
               templates, splits, batch_size, mesh):
    self.mesh = mesh
    self.splits = splits
    self.class_names = list(class_names)
    self.templates = list(templates)
    self.token_ids = tokenizer.encode(
        [template.format(name) for name in self.class_names for template in self.templates],
        max_text_len)
    # A multiple of the data-parallel size, so every eval batch shards evenly.
    ways = sharding.data_parallel_size(mesh)
    self.batch_size = max(ways, math.ceil(batch_size / ways) * ways)
    out = sharding.replicated(mesh)
    self._encode_image = jax.jit(encode_image, out_shardings=out)
    self._encode_text = jax.jit(encode_text, out_shardings=out)

  def _encode(self, encode, params, inputs: np.ndarray) -> np.ndarray:
    """Encodes `inputs` in fixed-size batches (the last one padded) -> `[n, d]`."""
    batch_sharding = sharding.batch_sharding(self.mesh)
    outputs = []
    for start in range(0, len(inputs), self.batch_size):
      chunk = inputs[start:start + self.batch_size]
      padding = self.batch_size - len(chunk)
      chunk = np.concatenate([chunk, np.zeros((padding,) + chunk.shape[1:], chunk.dtype)])
      with sharding.activate(self.mesh):
        embeddings = encode(params, sharding.put_replicated_data(chunk, batch_sharding))
      outputs.append(np.asarray(embeddings)[:len(chunk) - padding])
    return np.concatenate(outputs)

  def class_embeddings(self, params) -> np.ndarray:
    """`[num_classes, d]` unit vectors: the template ensemble of each class name."""
    text = self._encode(self._encode_text, params, self.token_ids)
    text = text.reshape(len(self.class_names), len(self.templates), -1).mean(axis=1)
    return text / np.linalg.norm(text, axis=-1, keepdims=True)

  def run(self, params) -> dict[str, float]:
    classes = self.class_embeddings(params)
    metrics = {}
    for name, split in self.splits.items():
      images = self._encode(self._encode_image, params, split['image'])
      scores = images @ classes.T
      labels = np.asarray(split['label'])
      ranking = np.argsort(-scores, axis=1)
      metrics[f'{name}/top1'] = float(np.mean(ranking[:, 0] == labels))
      metrics[f'{name}/top5'] = float(np.mean(np.any(ranking[:, :5] == labels[:, None], axis=1)))
      metrics[f'{name}/num_images'] = len(labels)
    metrics['num_classes'] = len(self.class_names)
    return metrics
