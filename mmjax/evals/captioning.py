"""Evaluation of generated answers: exact match per question kind, CIDEr and BLEU-4 for captions.

A model answers each eval prompt (`mmjax.data.instruct.load_eval`) with `answer_fn(params,
batch) -> int32 [b, n_new]` generated ids, batch = {'image': [b, S, S, 3], 'prompt_tokens':
int32 [b, P], 'prompt_mask': bool [b, P]}; the ids are decoded up to the first EOS. Per kind:
  exact_match  fraction of answers equal to the reference after `normalize_answer`
  cider        CIDEr (pycocoevalcap's scorer, 0..10 scale) on `caption_words`, caption kinds
  bleu4        corpus BLEU-4 (sacrebleu, 0..100, lower-cased, its 13a tokenizer), caption kinds
Java-free: pycocoevalcap's PTB tokenizer is replaced by `caption_words`.
"""

import re
import unicodedata

import numpy as np
from pycocoevalcap.cider.cider import Cider
import sacrebleu

from mmjax.data import instruct
from mmjax.evals import reports
from mmjax.evals.batching import BatchedApply

REPORT_EXAMPLES = 100


def normalize_answer(text: str) -> str:
  """Lower case, punctuation removed, runs of white space as one space, none around."""
  kept = ''.join(c for c in text.lower() if not unicodedata.category(c).startswith('P'))
  return ' '.join(kept.split())


def caption_words(text: str) -> str:
  """The lower-cased alphanumeric runs of `text` joined by spaces: CIDEr's tokens."""
  return ' '.join(re.findall(r'[^\W_]+', text.lower()))


def cider(predictions, references) -> tuple[float, np.ndarray]:
  """(corpus CIDEr, per-example CIDEr [n]) of n predictions against n lists of references."""
  scorer = Cider()
  score, scores = scorer.compute_score(
      {i: [caption_words(r) for r in refs] for i, refs in enumerate(references)},
      {i: [caption_words(p)] for i, p in enumerate(predictions)})
  return float(score), np.asarray(scores, np.float64)


def bleu4(predictions, references) -> float:
  """Corpus BLEU-4 (0..100) of n predictions against n lists of references (any number)."""
  streams = max(len(refs) for refs in references)
  reference_streams = [[refs[j] if j < len(refs) else None for refs in references]
                       for j in range(streams)]
  return float(sacrebleu.corpus_bleu(list(predictions), reference_streams,
                                     lowercase=True).score)


class AnswerEvaluator:
  """`run(params)` -> `{'<kind>/exact_match', '<kind>/num_examples'}` per kind, plus
  `'<kind>/cider'` and `'<kind>/bleu4'` for caption kinds.

  splits: {kind: {'image', 'prompt_tokens', 'prompt_mask', 'answer' (n reference strings),
  'example_id'}} as `instruct.load_eval`; caption_kinds: the kinds scored by CIDEr and BLEU;
  name: the report's file name prefix.
  """

  def __init__(self, *, answer_fn, tokenizer, splits, caption_kinds, batch_size, mesh,
               name: str = 'answers'):
    if not splits:
      raise ValueError('no question kinds to evaluate')
    self.name = name
    self.splits = splits
    self.caption_kinds = set(caption_kinds)
    self.tokenizer = tokenizer
    self._answer = BatchedApply(answer_fn, mesh, batch_size)
    self._last = {}

  def predictions(self, params, split: dict) -> list[str]:
    """The decoded answers to the prompts of `split`, in order."""
    inputs = {key: split[key] for key in ('image', 'prompt_tokens', 'prompt_mask')}
    return [self.tokenizer.decode(ids) for ids in self._answer(params, inputs)]

  def run(self, params) -> dict[str, float]:
    metrics = {}
    for kind, split in self.splits.items():
      predictions = self.predictions(params, split)
      references = [[answer] for answer in split['answer']]
      hits = np.array([normalize_answer(p) == normalize_answer(r[0])
                       for p, r in zip(predictions, references)])
      kind_metrics = {'exact_match': float(hits.mean()), 'num_examples': len(hits)}
      per_example = {'exact_match': hits}
      if kind in self.caption_kinds:
        kind_metrics['cider'], per_example['cider'] = cider(predictions, references)
        kind_metrics['bleu4'] = bleu4(predictions, references)
      metrics.update({f'{kind}/{key}': value for key, value in kind_metrics.items()})
      self._last[kind] = (predictions, per_example, kind_metrics)
    return metrics

  def report(self, num_examples: int = REPORT_EXAMPLES) -> dict:
    """Per kind, from the last `run`: its metrics and the first examples' predictions."""
    report = {}
    for kind, (predictions, per_example, metrics) in self._last.items():
      split = self.splits[kind]
      examples = []
      for i in range(min(num_examples, len(predictions))):
        example = {'example_id': int(split['example_id'][i]), 'prediction': predictions[i],
                   'reference': split['answer'][i]}
        example.update({key: values[i].item() for key, values in per_example.items()})
        examples.append(example)
      report[kind] = {'metrics': metrics, 'examples': examples}
    return report

  def write_report(self, directory: str, step: int) -> list[str]:
    return reports.write_json(directory, self.name, step, self.report())


def _from_config(capabilities, data, mesh, name, kinds, default_kinds,
                batch_size) -> AnswerEvaluator:
  generator = capabilities.require('generator', f'config.evals.{name}')
  kinds = list(kinds or default_kinds)
  if not kinds:
    raise ValueError(f'config.evals.{name}: no question kind to evaluate is installed here '
                     f'(installed: {instruct.available_kinds()})')
  unavailable = set(kinds) - set(instruct.available_kinds())
  if unavailable:
    raise ValueError(f'question kinds {sorted(unavailable)} are unknown or their data is not '
                     f'installed; available: {instruct.available_kinds()}')
  instruct.build(data.data_dir, kinds)
  splits = instruct.load_eval(
      data.data_dir, tokenizer=data.tokenizer, kinds=kinds,
      num_image_tokens=data.num_image_tokens, image_size=data.image_size,
      prompt_len=data.prompt_len)
  caption_kinds = [k for k in kinds if instruct.QUESTION_KINDS[k].captioning]
  return AnswerEvaluator(answer_fn=generator.generate, tokenizer=data.tokenizer,
                         splits=splits, caption_kinds=caption_kinds, batch_size=batch_size,
                         mesh=mesh, name=name)


def captioning_from_config(capabilities, data, mesh, *, name, batch_size,
                           kinds=None) -> AnswerEvaluator:
  """Answers of a `Generator` to the question `kinds` (default: the installed caption
  kinds), scored by exact match, CIDEr and BLEU-4; prompts as `EvalData` says (tokenizer,
  image size, image tokens, prompt length)."""
  default = [k for k in instruct.available_kinds() if instruct.QUESTION_KINDS[k].captioning]
  return _from_config(capabilities, data, mesh, name, kinds, default, batch_size)


def qa_from_config(capabilities, data, mesh, *, name, batch_size, kinds=None) -> AnswerEvaluator:
  """As `captioning_from_config`, default kinds: the installed short-answer kinds."""
  default = [k for k in instruct.available_kinds()
             if not instruct.QUESTION_KINDS[k].captioning]
  return _from_config(capabilities, data, mesh, name, kinds, default, batch_size)
