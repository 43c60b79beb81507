"""Image tokenizer evaluation: reconstruction PSNR / SSIM and codebook health.

Every held-out image goes through `tokenize` then `detokenize` (images -> discrete tokens
-> images, exactly what an early-fusion LM sees and produces). Per split:
  psnr            mean over images of 10 log10(1 / MSE), pixels in [0, 1] (clipped)
  ssim            mean SSIM (Wang et al. 2004: Gaussian window sigma 1.5, 11 taps,
                  K1 = 0.01, K2 = 0.03, data range 1), averaged over channels
  codebook_usage  fraction of the codebook's codes used at least once
  perplexity      exp(entropy) of the code histogram: the effective number of codes
and the same over all splits together (`all/...`). `write_report` draws originals above
their reconstructions, one PNG per split.
"""

import os

import numpy as np
from PIL import Image
from scipy import ndimage

from mmjax import files
from mmjax.data import pipeline
from mmjax.evals.batching import BatchedApply

SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5  # 2 * int(3.5 * 1.5 + 0.5) + 1 = 11 taps, as scikit-image's SSIM


def to_unit_range(images: np.ndarray) -> np.ndarray:
  """[-1, 1] images -> [0, 1], clipped."""
  return np.clip((np.asarray(images, np.float64) + 1) / 2, 0, 1)


def psnr(images: np.ndarray, reconstructions: np.ndarray) -> np.ndarray:
  """Per-image PSNR in dB of `[n, h, w, c]` images in [0, 1]."""
  mse = np.mean(np.square(images - reconstructions), axis=(1, 2, 3))
  return 10 * np.log10(1.0 / np.maximum(mse, 1e-12))


def ssim(images: np.ndarray, reconstructions: np.ndarray) -> np.ndarray:
  """Per-image SSIM of `[n, h, w, c]` images in [0, 1] (data range 1).

  Local means, variances and covariance under a Gaussian window (sigma 1.5, 11 taps);
  the SSIM map is averaged over pixels at least 5 from the border (all pixels when the
  image is smaller than the window) and over channels.
  """
  x, y = np.asarray(images, np.float64), np.asarray(reconstructions, np.float64)
  blur = lambda a: ndimage.gaussian_filter(a, sigma=(0, SSIM_SIGMA, SSIM_SIGMA, 0),
                                           truncate=SSIM_TRUNCATE, mode='reflect')
  mu_x, mu_y = blur(x), blur(y)
  var_x, var_y = blur(x * x) - mu_x ** 2, blur(y * y) - mu_y ** 2
  cov = blur(x * y) - mu_x * mu_y
  c1, c2 = 0.01 ** 2, 0.03 ** 2
  ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2) /
              ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2)))
  pad = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)
  if min(x.shape[1:3]) > 2 * pad:
    ssim_map = ssim_map[:, pad:-pad, pad:-pad]
  return ssim_map.mean(axis=(1, 2, 3))


def codebook_metrics(tokens: np.ndarray, num_codes: int) -> dict[str, float]:
  """Fraction of codes used and perplexity of the code histogram of `tokens`."""
  counts = np.bincount(np.asarray(tokens).reshape(-1), minlength=num_codes)
  p = counts / counts.sum()
  nonzero = p[p > 0]
  return {'codebook_usage': float(np.mean(counts > 0)),
          'perplexity': float(np.exp(-np.sum(nonzero * np.log(nonzero))))}


class ReconstructionEvaluator:
  """`run(params)` -> `{'<split>/psnr', '<split>/ssim', '<split>/codebook_usage',
  '<split>/perplexity', 'all/...'}`.

  tokenize(params, images [b, H, W, 3]) -> int32 [b, T]; detokenize(params, tokens) ->
  images; splits: `{name: float32 images [n, H, W, 3] in [-1, 1]}`.
  """

  def __init__(self, *, tokenize, detokenize, num_codes, splits, batch_size, mesh,
               grid_images: int = 16):
    self.splits = splits
    self.num_codes = num_codes
    self.grid_images = grid_images
    self._tokenize = BatchedApply(tokenize, mesh, batch_size)
    self._detokenize = BatchedApply(detokenize, mesh, batch_size)
    self._last = {}

  def reconstruct(self, params, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`(tokens [n, T], reconstructions [n, H, W, 3])` of images in [-1, 1]."""
    tokens = self._tokenize(params, images)
    return tokens, self._detokenize(params, tokens)

  def run(self, params) -> dict[str, float]:
    metrics, all_tokens, scores = {}, [], {'psnr': [], 'ssim': []}
    for name, images in self.splits.items():
      tokens, reconstructions = self.reconstruct(params, images)
      originals, reconstructed = to_unit_range(images), to_unit_range(reconstructions)
      split_scores = {'psnr': psnr(originals, reconstructed),
                      'ssim': ssim(originals, reconstructed)}
      for key, values in split_scores.items():
        metrics[f'{name}/{key}'] = float(np.mean(values))
        scores[key].append(values)
      metrics.update({f'{name}/{k}': v
                      for k, v in codebook_metrics(tokens, self.num_codes).items()})
      metrics[f'{name}/num_images'] = len(images)
      all_tokens.append(tokens.reshape(-1))
      self._last[name] = (images, reconstructions)
    if len(self.splits) > 1:
      for key, values in scores.items():
        metrics[f'all/{key}'] = float(np.mean(np.concatenate(values)))
      metrics.update({f'all/{k}': v for k, v in
                      codebook_metrics(np.concatenate(all_tokens), self.num_codes).items()})
    return metrics

  def write_report(self, directory: str, step: int, columns: int = 8,
                   min_side: int = 64) -> list[str]:
    """One PNG per split: rows of originals, each above its row of reconstructions."""
    paths = []
    for name, (images, reconstructions) in self._last.items():
      count = min(self.grid_images, len(images))
      picks = np.linspace(0, len(images) - 1, count).astype(int)
      grid = image_grid(to_unit_range(images[picks]), to_unit_range(reconstructions[picks]),
                        columns, min_side)
      path = os.path.join(directory, f'reconstruction_{name.replace("/", "_")}_{step}.png')
      with files.atomic_write(path, 'wb') as f:
        Image.fromarray(grid).save(f, format='PNG')
      paths.append(path)
    return paths


def image_grid(originals: np.ndarray, reconstructions: np.ndarray, columns: int,
               min_side: int = 64, gap: int = 2) -> np.ndarray:
  """uint8 grid: for each row of `columns` images, originals then reconstructions below;
  images upscaled (nearest) by an integer factor to at least `min_side` pixels."""
  n, side = originals.shape[0], originals.shape[1]
  scale = max(1, -(-min_side // side))
  tile = side * scale
  rows = -(-n // columns)
  grid = np.full((rows * 2 * (tile + gap) + gap, columns * (tile + gap) + gap, 3), 255,
                 np.uint8)
  for index in range(n):
    row, column = divmod(index, columns)
    for offset, image in enumerate((originals[index], reconstructions[index])):
      pixels = np.round(np.kron(image, np.ones((scale, scale, 1))) * 255).astype(np.uint8)
      top = (2 * row + offset) * (tile + gap) + gap
      left = column * (tile + gap) + gap
      grid[top:top + tile, left:left + tile] = pixels
  return grid


def reconstruction_from_config(capabilities, data, mesh, *, name, batch_size, dataset=None,
                               grid_images=16) -> ReconstructionEvaluator:
  """PSNR, SSIM and codebook use of an `ImageTokenizer` on the evaluation splits of `dataset`
  (default: the training one, `EvalData.dataset`; emoji: the held-out style, seen and unseen
  names), at the task's image size; `grid_images` per split in the report's PNG."""
  tokenizer = capabilities.require('image_tokenizer', f'config.evals.{name}')
  dataset = dataset or data.dataset
  pipeline.build(dataset, data.data_dir)
  splits = {split_name: pipeline.load_eval(dataset, split, data.data_dir,
                                           data.image_size)['image']
            for split_name, split in pipeline.eval_splits(dataset).items()}
  return ReconstructionEvaluator(
      tokenize=tokenizer.tokenize, detokenize=tokenizer.detokenize,
      num_codes=tokenizer.num_codes, splits=splits, batch_size=batch_size, mesh=mesh,
      grid_images=grid_images)
