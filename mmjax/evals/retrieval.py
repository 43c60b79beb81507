"""Image-text retrieval with a dual encoder: Recall@K in both directions.

Every image and every caption is embedded once; image->text ranks all captions for each
image (a hit if any of the image's own captions is in the top K), text->image ranks all
images for each caption (a hit if its image is in the top K), as in CLIP's Flickr30k/COCO
evaluation. `write_report` draws the top images retrieved for a few captions.
"""

import os

from matplotlib.figure import Figure  # No pyplot: no global backend is chosen or needed.
import numpy as np

from mmjax import files
from mmjax.evals.batching import BatchedApply

RECALL_AT = (1, 5, 10)


def recall_at_k(image_embeddings: np.ndarray, text_embeddings: np.ndarray,
                text_to_image: np.ndarray, ks=RECALL_AT) -> dict[str, float]:
  """Recall@K of image->text and text->image retrieval.

  image_embeddings `[n_images, d]`, text_embeddings `[n_texts, d]` (unit vectors);
  text_to_image `[n_texts]`: the index of the image each caption describes.
  Returns `{'image_to_text/R@K': ..., 'text_to_image/R@K': ...}`.
  """
  text_to_image = np.asarray(text_to_image)
  scores = image_embeddings @ text_embeddings.T  # [n_images, n_texts]
  # Rank of the best true match = number of candidates scoring strictly higher than it.
  own = text_to_image[None, :] == np.arange(len(image_embeddings))[:, None]
  best_true_text = np.max(np.where(own, scores, -np.inf), axis=1)
  image_rank = np.sum(scores > best_true_text[:, None], axis=1)
  true_image_score = scores[text_to_image, np.arange(len(text_to_image))]
  text_rank = np.sum(scores > true_image_score[None, :], axis=0)
  metrics = {}
  for k in ks:
    metrics[f'image_to_text/R@{k}'] = float(np.mean(image_rank < k))
    metrics[f'text_to_image/R@{k}'] = float(np.mean(text_rank < k))
  return metrics


class RetrievalEvaluator:
  """`run(params)` -> `{'<split>/image_to_text/R@1': ..., '<split>/text_to_image/R@10': ...}`.

  splits maps a name to `{'image': [n, h, w, 3], 'caption': [m] str, 'text_to_image': [m]}`
  (captions without an image are not allowed; an image may have several captions).
  encode_image, encode_text, tokenize: as `capabilities.DualEncoder`'s.
  """

  def __init__(self, *, encode_image, encode_text, tokenize, splits, batch_size, mesh):
    self.splits = splits
    for name, split in splits.items():
      index = np.asarray(split['text_to_image'])
      if len(index) != len(split['caption']):
        raise ValueError(f'retrieval split {name!r}: {len(split["caption"])} captions but '
                         f'{len(index)} text_to_image entries')
      if len(index) and (index.min() < 0 or index.max() >= len(split['image'])):
        raise ValueError(f'retrieval split {name!r}: text_to_image points outside the '
                         f'{len(split["image"])} images')
    self.token_ids = {name: tokenize(list(split['caption']))
                      for name, split in splits.items()}
    self._encode_image = BatchedApply(encode_image, mesh, batch_size)
    self._encode_text = BatchedApply(encode_text, mesh, batch_size)
    self._last = {}

  def run(self, params) -> dict[str, float]:
    metrics = {}
    for name, split in self.splits.items():
      images = self._encode_image(params, split['image'])
      texts = self._encode_text(params, self.token_ids[name])
      for key, value in recall_at_k(images, texts, split['text_to_image']).items():
        metrics[f'{name}/{key}'] = value
      metrics[f'{name}/num_images'] = len(images)
      metrics[f'{name}/num_texts'] = len(texts)
      self._last[name] = (images, texts)
    return metrics

  def write_report(self, directory: str, step: int, num_queries: int = 6,
                   top: int = 5) -> list[str]:
    """For the first `num_queries` captions of each split: the `top` images retrieved.

    The true image is framed green, others red. One PNG per split.
    """
    paths = []
    for name, (images, texts) in self._last.items():
      split = self.splits[name]
      queries = np.linspace(0, len(texts) - 1, min(num_queries, len(texts))).astype(int)
      figure = Figure(figsize=(2 * (top + 1), 2 * len(queries)))
      axes = figure.subplots(len(queries), top + 1, squeeze=False)
      for row, query in enumerate(queries):
        ranking = np.argsort(-(images @ texts[query]))[:top]
        axes[row, 0].text(0.5, 0.5, _wrap(split['caption'][query]), ha='center', va='center',
                          fontsize=8, wrap=True)
        axes[row, 0].axis('off')
        for column, image_index in enumerate(ranking, start=1):
          axis = axes[row, column]
          axis.imshow((np.asarray(split['image'][image_index]) + 1) / 2)
          colour = 'green' if image_index == split['text_to_image'][query] else 'red'
          for spine in axis.spines.values():
            spine.set_edgecolor(colour)
            spine.set_linewidth(3)
          axis.set_xticks([])
          axis.set_yticks([])
      figure.suptitle(f'text -> image retrieval, {name}, step {step}')
      figure.tight_layout()
      path = os.path.join(directory, f'retrieval_{name.replace("/", "_")}_{step}.png')
      with files.atomic_write(path, 'wb') as f:
        figure.savefig(f, dpi=80, format='png')
      paths.append(path)
    return paths


def _wrap(text: str, width: int = 22) -> str:
  words, lines, line = text.split(), [], ''
  for word in words:
    if line and len(line) + 1 + len(word) > width:
      lines.append(line)
      line = word
    else:
      line = f'{line} {word}'.strip()
  return '\n'.join(lines + [line])
