"""Text -> image evaluation of an early-fusion decoder: do generated images show what was asked?

Prompts are emoji names (`'<name>.' [begin]`, `early_fusion.caption_prompt`), `num_prompts`
of the held-out style's seen names spread over the split. A judge, another run's dual
encoder (the `configs/clip.py:small` run), ranks all emoji names for each generated image
(zero-shot with the dataset's hand templates); reported:
  conditional/top1, conditional/top5   the prompted name among the judge's top k;
  unconditional/top5                   the same test for images generated from no caption
                                       (`[begin]` alone), paired with the same names: the
                                       rate a generator ignoring the text would reach;
  chance/top5                          5 / number of names;
  image_nll/captioned, /uncaptioned    with a `Scorer`: the mean negative log-likelihood of
                                       the codes of the prompts' real (held-out style)
                                       images, given the caption and given no caption.
`write_report` writes a PNG: each generated image above its prompt, then the unconditional
samples.
"""

import os

import numpy as np
from PIL import Image, ImageDraw

from mmjax import files
from mmjax.data import captions
from mmjax.data import early_fusion
from mmjax.data import pipeline
from mmjax.data.tokenizers.byte import PAD_ID
from mmjax.evals.batching import BatchedApply
from mmjax.evals.reconstruction import to_unit_range
from mmjax.evals.zeroshot import ZeroShotEvaluator, top_k_hits


def left_padded(rows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """(int32 [n, P], bool [n, P]): `rows` left padded to the longest."""
  length = max(len(row) for row in rows)
  tokens = np.full((len(rows), length), PAD_ID, np.int32)
  for i, row in enumerate(rows):
    tokens[i, length - len(row):] = row
  mask = np.zeros(tokens.shape, bool)
  for i, row in enumerate(rows):
    mask[i, length - len(row):] = True
  return tokens, mask


class TextToImageEvaluator:
  """`run(params)` -> the metrics of the module docstring."""

  def __init__(self, *, generate, judge, score, tokenizer, class_names, templates, images,
               labels, num_image_tokens, batch_size, mesh, seed: int = 0,
               grid_images: int = 32):
    self.names = [class_names[label] for label in labels]
    self.labels = np.asarray(labels)
    self.images = images
    self.seed = seed
    self.grid_images = grid_images
    self._judge = judge
    self._judge_names = ZeroShotEvaluator(
        encode_image=judge.dual_encoder.encode_image, encode_text=judge.dual_encoder.encode_text,
        tokenize=judge.dual_encoder.tokenize, class_names=class_names, templates=templates,
        splits={}, batch_size=batch_size, mesh=mesh)
    self._generate = BatchedApply(generate, mesh, batch_size)
    self._score = None if score is None else BatchedApply(score, mesh, batch_size)
    self.prompts = {
        'conditional': left_padded([early_fusion.caption_prompt(tokenizer, n)
                                    for n in self.names]),
        'unconditional': left_padded([early_fusion.caption_prompt(tokenizer, None)
                                      for _ in self.names]),
    }
    rows = early_fusion.caption_to_image_rows(tokenizer, self.names,
                                              num_image_tokens=num_image_tokens,
                                              max_len=max(len(r) for r in self.prompts[
                                                  'conditional'][0]) + num_image_tokens + 2)
    uncaptioned = {k: np.repeat(v[-1:], len(self.names), 0) for k, v in rows.items()}
    self.rows = {'captioned': {k: v[:-1] for k, v in rows.items() if k != 'caption_cut'},
                 'uncaptioned': {k: v for k, v in uncaptioned.items() if k != 'caption_cut'}}
    self.last_images = {}

  def run(self, params) -> dict[str, float]:
    metrics = {}
    seeds = self.seed * 1_000_003 + np.arange(len(self.names), dtype=np.int32)
    for name, (tokens, mask) in self.prompts.items():
      images = self._generate(params, {'prompt_tokens': tokens, 'prompt_mask': mask,
                                       'seed': seeds})
      scores = self._judge_names.scores(self._judge.params, images)
      for k in (1, 5):
        metrics[f'{name}/top{k}'] = float(np.mean(top_k_hits(scores, self.labels, k)))
      self.last_images[name] = images
    metrics['chance/top5'] = 5 / len(self._judge_names.class_names)
    metrics['num_prompts'] = len(self.names)
    if self._score is not None:
      for name, rows in self.rows.items():
        log_prob = self._score(params, {'image': self.images, **rows})
        metrics[f'image_nll/{name}'] = float(-np.mean(log_prob))
    return metrics

  def write_report(self, directory: str, step: int, side: int = 64) -> list[str]:
    """`text_to_image_<step>.png`: rows of generated images, each above its prompt; then
    the unconditional samples."""
    if not self.last_images:
      return []
    count = min(self.grid_images, len(self.names))
    columns = 8
    label_height, gap = 24, 4
    cell_width = max(side, 96)
    rows = -(-count // columns) + 1
    height = rows * (side + label_height + gap) + gap
    grid = Image.new('RGB', (columns * (cell_width + gap) + gap, height), 'white')
    draw = ImageDraw.Draw(grid)
    picks = np.linspace(0, len(self.names) - 1, count).astype(int)
    cells = [(self.last_images['conditional'][i], self.names[i]) for i in picks]
    cells += [(self.last_images['unconditional'][i], '(no caption)') for i in picks[:columns]]
    for index, (image, label) in enumerate(cells):
      row, column = divmod(index, columns) if index < count else (rows - 1, index - count)
      pixels = np.round(to_unit_range(image[None])[0] * 255).astype(np.uint8)
      tile = Image.fromarray(pixels).resize((side, side), Image.NEAREST)
      left = gap + column * (cell_width + gap)
      top = gap + row * (side + label_height + gap)
      grid.paste(tile, (left + (cell_width - side) // 2, top))
      for line, text in enumerate((label[:16], label[16:32])):
        draw.text((left, top + side + 1 + 11 * line), text, fill='black')
    path = os.path.join(directory, f'text_to_image_{step}.png')
    with files.atomic_write(path, 'wb') as f:
      grid.save(f, format='PNG')
    return [path]


def text_to_image_from_config(capabilities, data, mesh, *, name, batch_size,
                              num_prompts: int = 128, seed: int = 0,
                              grid_images: int = 32) -> TextToImageEvaluator:
  """Needs the `image_generator` and `judge` capabilities (`scorer` optional); the prompts
  are `num_prompts` names of the emoji held-out style's seen split, evenly spread."""
  where = f'config.evals.{name}'
  generator = capabilities.require('image_generator', where)
  if capabilities.judge is None:
    raise ValueError(f'{where} needs a judge, the dual encoder that names the generated '
                     'images (Chameleon: config.judge.clip_workdir, a CLIP run of ours)')
  judge = capabilities.judge
  pipeline.build('emoji', data.data_dir)
  split = pipeline.load_eval('emoji', pipeline.eval_splits('emoji')['heldout_style/seen'],
                             data.data_dir, data.image_size)
  picks = np.linspace(0, len(split['label']) - 1, min(num_prompts, len(split['label'])))
  picks = picks.astype(int)
  return TextToImageEvaluator(
      generate=generator.generate, judge=judge,
      score=None if capabilities.scorer is None else capabilities.scorer.score,
      tokenizer=data.tokenizer, class_names=pipeline.class_names('emoji', data.data_dir),
      templates=captions.zeroshot_templates('emoji', 'hand'), images=split['image'][picks],
      labels=split['label'][picks], num_image_tokens=data.num_image_tokens,
      batch_size=batch_size, mesh=mesh, seed=seed, grid_images=grid_images)
