"""Training-stability diagnostics of an early-fusion decoder on held-out rows (Chameleon's
stability ablation: QK-norm, z-loss, norm placement).

Rows: text -> image rows of `num_rows` names of the emoji held-out style's seen split (their
real images' codes; `early_fusion.caption_to_image_rows`) and the training-format question
rows of `kinds` on their eval splits (`instruct.training_rows`). Over every weighted target
of all rows (each row's loss weights, as in training):
  text_loss            mean negative log-likelihood of the targets that are not image codes
                       (answers, end-of-text and end-image markers)
  image_loss           the same over the image-code targets
  logsumexp            mean logsumexp of the output logits (the quantity z-loss pulls to 0)
  max_attention_logit  the largest pre-softmax attention logit over rows, layers and heads
  diverged             1.0 if any of the above is not finite, or a loss is above the loss of
                       a uniform guess over the vocabulary (ln V), else 0.0
Needs the `token_statistics` capability.
"""

import math

import numpy as np

from mmjax.data import early_fusion
from mmjax.data import instruct
from mmjax.data import pipeline
from mmjax.evals.batching import BatchedApply


class StabilityEvaluator:
  """`run(params)` -> the metrics of the module docstring.

  groups: {name: {'image' [n, S, S, 3], 'tokens', 'targets' int32 [n, L], 'loss_weights'
  float32 [n, L]}}, each group's L its own; vocab_size: the decoder's.
  """

  def __init__(self, *, statistics, groups: dict, vocab_size: int, batch_size: int, mesh):
    self.groups = groups
    self.vocab_size = vocab_size
    self._statistics = BatchedApply(statistics, mesh, batch_size)

  def run(self, params) -> dict[str, float]:
    sums = dict(text=0.0, text_count=0.0, image=0.0, image_count=0.0, logsumexp=0.0)
    max_logit = -np.inf
    for rows in self.groups.values():
      stats = self._statistics(params, rows)
      weights = rows['loss_weights'].astype(np.float64)
      nll = -stats['log_prob'].astype(np.float64)
      is_image = stats['is_image']
      sums['text'] += float(np.sum(weights * nll * ~is_image))
      sums['text_count'] += float(np.sum(weights * ~is_image))
      sums['image'] += float(np.sum(weights * nll * is_image))
      sums['image_count'] += float(np.sum(weights * is_image))
      sums['logsumexp'] += float(np.sum(weights * stats['logsumexp']))
      max_logit = max(max_logit, float(np.max(stats['max_attention_logit'])))
    count = sums['text_count'] + sums['image_count']
    metrics = {
        'text_loss': sums['text'] / max(sums['text_count'], 1.0),
        'image_loss': sums['image'] / max(sums['image_count'], 1.0),
        'logsumexp': sums['logsumexp'] / max(count, 1.0),
        'max_attention_logit': max_logit,
    }
    uniform = math.log(self.vocab_size)
    broken = any(not math.isfinite(v) for v in metrics.values()) or any(
        metrics[key] > uniform for key in ('text_loss', 'image_loss'))
    metrics['diverged'] = float(broken)
    return metrics


def question_rows(data_dir: str, kind: str, *, tokenizer, num_image_tokens: int,
                  image_size: int) -> dict:
  """Kind `kind`'s eval examples as training rows (`instruct.training_rows`), as long as
  the longest row."""
  split = instruct.load_eval(data_dir, tokenizer=tokenizer, kinds=[kind],
                             num_image_tokens=num_image_tokens, image_size=image_size)[kind]
  question = instruct.QUESTION_KINDS[kind].question
  longest = max(len(tokenizer.encode_text(a)) for a in split['answer'])
  max_len = instruct.prompt_length(tokenizer, [kind], num_image_tokens) + longest + 1
  rows = instruct.training_rows(tokenizer, question, split['answer'],
                                num_image_tokens=num_image_tokens, max_len=max_len)
  return {'image': split['image'], 'tokens': rows['tokens'], 'targets': rows['targets'],
          'loss_weights': rows['loss_weights']}


def stability_from_config(capabilities, data, mesh, *, name, batch_size, num_rows: int = 256,
                          kinds=('emoji_group',)) -> StabilityEvaluator:
  """The held-out rows: `num_rows` text -> image rows (the emoji held-out style's seen
  names, evenly spread) and every eval example of the question `kinds`."""
  statistics = capabilities.require('token_statistics', f'config.evals.{name}').statistics
  pipeline.build('emoji', data.data_dir)
  split = pipeline.load_eval('emoji', pipeline.eval_splits('emoji')['heldout_style/seen'],
                             data.data_dir, data.image_size)
  picks = np.linspace(0, len(split['label']) - 1, min(num_rows, len(split['label'])))
  picks = picks.astype(int)
  class_names = pipeline.class_names('emoji', data.data_dir)
  names = [class_names[label] for label in split['label'][picks]]
  longest = max(len(data.tokenizer.encode_text(f'{n}.')) for n in names)
  rows = early_fusion.caption_to_image_rows(
      data.tokenizer, names, num_image_tokens=data.num_image_tokens,
      max_len=longest + data.num_image_tokens + 4)
  groups = {early_fusion.CAPTION_TO_IMAGE: {
      'image': split['image'][picks],
      **{key: rows[key][:-1] for key in ('tokens', 'targets', 'loss_weights')}}}
  instruct.build(data.data_dir, list(kinds))
  for kind in kinds:
    groups[kind] = question_rows(data.data_dir, kind, tokenizer=data.tokenizer,
                                 num_image_tokens=data.num_image_tokens,
                                 image_size=data.image_size)
  return StabilityEvaluator(statistics=statistics, groups=groups,
                            vocab_size=data.tokenizer.vocab_size, batch_size=batch_size,
                            mesh=mesh)
