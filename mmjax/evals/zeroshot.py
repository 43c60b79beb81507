"""Zero-shot classification with a dual encoder (CLIP's evaluation).

Each class name is written into every prompt template ("an emoji of {}."); the text
embeddings of a class are averaged over templates and renormalised (the template
ensemble). An image is classified by its most similar class embedding; top-1/5/10
accuracy is reported per split, and `write_report` adds per-class accuracy and the most
confused class pairs.
"""

import collections

import numpy as np

from mmjax.evals import reports
from mmjax.evals.batching import BatchedApply

TOP_K = (1, 5, 10)


def top_k_hits(scores: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
  """`[n]` bool: is `labels[i]` among the `k` highest `scores[i]` (`[n, classes]`)?"""
  k = min(k, scores.shape[1])
  top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
  return np.any(top == labels[:, None], axis=1)


class ZeroShotEvaluator:
  """`run(params)` -> `{'<split>/top1': ..., '<split>/top5': ..., '<split>/top10': ...}`.

  encode_image(params, images [b, h, w, 3]) and encode_text(params, token_ids [b, l]) return
  unit-norm embeddings `[b, d]`; tokenize(texts) -> int32 [n, l] the ids encode_text reads;
  `splits` maps a name to `{'image': [n, h, w, 3], 'label': [n]}` with labels indexing
  `class_names`; `templates` are format strings.
  """

  def __init__(self, *, encode_image, encode_text, tokenize, class_names, templates, splits,
               batch_size, mesh):
    self.splits = splits
    self.class_names = list(class_names)
    self.templates = list(templates)
    self.token_ids = tokenize(
        [template.format(name) for name in self.class_names for template in self.templates])
    self._encode_image = BatchedApply(encode_image, mesh, batch_size)
    self._encode_text = BatchedApply(encode_text, mesh, batch_size)
    self._last_scores = {}

  def class_embeddings(self, params) -> np.ndarray:
    """`[num_classes, d]` unit vectors: the template ensemble of each class name."""
    text = self._encode_text(params, self.token_ids)
    text = text.reshape(len(self.class_names), len(self.templates), -1).mean(axis=1)
    return text / np.linalg.norm(text, axis=-1, keepdims=True)

  def scores(self, params, images: np.ndarray) -> np.ndarray:
    """`[n, num_classes]` cosine similarity of each image to each class embedding."""
    return self._encode_image(params, images) @ self.class_embeddings(params).T

  def run(self, params) -> dict[str, float]:
    classes = self.class_embeddings(params)
    metrics = {}
    for name, split in self.splits.items():
      scores = self._encode_image(params, split['image']) @ classes.T
      labels = np.asarray(split['label'])
      for k in TOP_K:
        metrics[f'{name}/top{k}'] = float(np.mean(top_k_hits(scores, labels, k)))
      metrics[f'{name}/num_images'] = len(labels)
      self._last_scores[name] = (scores, labels)
    metrics['num_classes'] = len(self.class_names)
    metrics['num_templates'] = len(self.templates)
    return metrics

  def report(self, num_confusions: int = 20) -> dict:
    """Per split, from the last `run`: per-class accuracy and the most confused pairs."""
    report = {}
    for name, (scores, labels) in self._last_scores.items():
      predicted = np.argmax(scores, axis=1)
      per_class = collections.defaultdict(list)
      for label, guess in zip(labels, predicted):
        per_class[self.class_names[label]].append(bool(label == guess))
      confusions = collections.Counter(
          (self.class_names[label], self.class_names[guess])
          for label, guess in zip(labels, predicted) if label != guess)
      report[name] = {
          'per_class_top1': {c: float(np.mean(hits)) for c, hits in sorted(per_class.items())},
          'most_confused': [{'true': t, 'predicted': p, 'count': n}
                            for (t, p), n in confusions.most_common(num_confusions)],
      }
    return report

  def write_report(self, directory: str, step: int) -> list[str]:
    return reports.write_json(directory, 'zeroshot', step, self.report())
