"""Few-shot classification by ranking: does the model name an unseen-style emoji after k examples?

For k in `shots`, every query (an emoji image of the held-out style, its name seen in
training or, with `names='unseen'`, new) comes with C candidate names (the right one among
C - 1 other names of the support set: drawings of the other styles) and k demonstrations
(image, caption) before it: k of the C candidates at random, each with a support drawing, so
that the answer is shown with probability k / C (`mmjax.data.interleaved.load_fewshot`); k
other names (the format only); or the k drawings of the candidates most similar to the query
(`RetrievedDemonstrations`, RICES). The model scores each candidate by the mean
log-probability of ' <name>.' after `... <image> 'an emoji of'`; the prediction is the best
scored candidate (the first on ties). Metrics per k: `<k>shot/accuracy` (fraction of queries
whose prediction is the right name; chance 1 / C), `<k>shot/num_examples` and, for k > 0, the
fraction of queries whose answer a demonstration shows (`<k>shot/answer_shown`; with
retrieved demonstrations and k = 1, the vision tower's nearest-neighbour accuracy) and the
accuracy over those and over the others (`<k>shot/accuracy_answer_shown`,
`<k>shot/accuracy_answer_not_shown`; absent when empty). For k >= 2, where the splits list the
names ('candidates', 'demonstrations'), which shown name the model picks: the fraction of
queries whose prediction is some demonstration's name (`<k>shot/picked_shown`) and the name
of the last one, next to the query (`<k>shot/picked_last_shown`). A model that copies a shown
name regardless of its position picks the last in 1/k of the former; one that copies the
nearest name, in all of it. (With retrieved demonstrations the last is also the most similar.)

`score_fn(params, batch) -> float32 [b]`, batch = {'image' [b, k + 1, S, S, 3], 'tokens',
'targets' int32 [b, L], 'loss_weights' float32 [b, L]}: a `capabilities.Scorer`'s.

Open-ended (`mode='generate'`, `FewShotGenerationEvaluator`): the same prompts, no
candidates; the model writes the caption's end greedily (`answer_fn`, a
`capabilities.Generator`'s) and the name it writes must be the answer exactly
(`<k>shot/exact_match`; chance is ~0 for a model that cannot see), which is Flamingo's
open-ended captioning and VQA setting. Besides the shown/not-shown split,
`<k>shot/named_shown`: the fraction of queries whose written name is a demonstration's
(copying), for k > 0.
"""


import numpy as np

from mmjax.data import interleaved
from mmjax.data import pipeline
from mmjax.evals import reports
from mmjax.evals.batching import BatchedApply

ROW_KEYS = ('image', 'tokens', 'targets', 'loss_weights')


def ranking_correct(scores, answer_index) -> np.ndarray:
  """bool [n]: whether each row of `scores [n, C]` has its argmax (first on ties) at
  `answer_index [n]`."""
  return np.argmax(scores, axis=1) == np.asarray(answer_index)


class RetrievedDemonstrations:
  """`self(params)` -> splits whose demonstrations are retrieved: RICES (Yang et al. 2022),
  which Flamingo uses for few-shot classification.

  Each query's k demonstrations are the k drawings of its candidates (support examples) most
  similar to the query image under `embed_fn(params, images [b, S, S, 3]) -> [b, d]`
  (unit vectors; the task's frozen vision tower), least similar first, so the most similar
  one stands next to the query.
  """

  def __init__(self, *, queries, tokenizer, shots, embed_fn, mesh, batch_size):
    self.queries = queries
    self.tokenizer = tokenizer
    self.shots = tuple(shots)
    self._embed = BatchedApply(embed_fn, mesh, batch_size)
    self._pools = [queries.candidate_examples(q) for q in range(len(queries.answer))]
    self._pool_examples = np.unique(np.concatenate(self._pools))

  def demonstrations(self, params, k: int) -> list[np.ndarray]:
    """n arrays of k `train` example indices, in prompt order."""
    queries = self._embed(params, self.queries.images)
    pool = self._embed(params, np.stack([self.queries.support_image(i)
                                         for i in self._pool_examples]))
    row = {example: i for i, example in enumerate(self._pool_examples)}
    demos = []
    for query, examples in zip(queries, self._pools):
      similarity = pool[[row[e] for e in examples]] @ query
      demos.append(examples[np.argsort(similarity, kind='stable')[-k:]] if k else examples[:0])
    return demos

  def __call__(self, params) -> dict[int, dict]:
    return {k: interleaved.fewshot_split(self.tokenizer, self.queries,
                                         self.demonstrations(params, k))
            for k in self.shots}


class FewShotEvaluator:
  """`run(params)` -> `{'<k>shot/accuracy', '<k>shot/num_examples'}` for each k of `splits`.

  splits: {k: {'image', 'tokens', 'targets', 'loss_weights' ([n * C, ...], row q * C + c is
  query q with candidate c), 'answer_index' int [n], 'answer_shown' bool [n]}} as
  `interleaved.load_fewshot`, or a function of the params that returns them
  (`RetrievedDemonstrations`).
  """

  def __init__(self, *, score_fn, splits, batch_size, mesh):
    if not splits:
      raise ValueError('no shot counts to evaluate')
    self.splits = splits
    self._score = BatchedApply(score_fn, mesh, batch_size)

  def scores(self, params, split: dict) -> np.ndarray:
    """float [n, C]: each query's candidate scores."""
    scores = self._score(params, {key: split[key] for key in ROW_KEYS})
    return scores.reshape(len(split['answer_index']), -1)

  def run(self, params) -> dict[str, float]:
    metrics = {}
    splits = self.splits(params) if callable(self.splits) else self.splits
    for k, split in splits.items():
      scores = self.scores(params, split)
      right = ranking_correct(scores, split['answer_index'])
      metrics[f'{k}shot/accuracy'] = float(np.mean(right))
      metrics[f'{k}shot/num_examples'] = len(right)
      if k:
        metrics.update(_by_answer_shown(k, 'accuracy', right, split['answer_shown']))
      if k >= 2 and 'demonstrations' in split:
        metrics.update(_picked_demonstrations(k, np.argmax(scores, axis=1), split))
    return metrics


def _by_answer_shown(k: int, metric: str, right, answer_shown) -> dict[str, float]:
  """`<k>shot/answer_shown` (the fraction of queries whose answer a demonstration shows) and
  `<k>shot/<metric>_answer_shown` / `_answer_not_shown`: the mean of `right [n]` bool over
  those queries and over the others (absent when empty)."""
  shown = np.asarray(answer_shown)
  metrics = {f'{k}shot/answer_shown': float(np.mean(shown))}
  for name, subset in (('answer_shown', shown), ('answer_not_shown', ~shown)):
    if subset.any():
      metrics[f'{k}shot/{metric}_{name}'] = float(np.mean(right[subset]))
  return metrics


def _picked_demonstrations(k: int, picked, split) -> dict[str, float]:
  """`<k>shot/picked_shown` and `<k>shot/picked_last_shown` (see the module docstring) of the
  predicted candidate indices `picked [n]`."""
  names = [candidates[p] for candidates, p in zip(split['candidates'], picked)]
  demos = split['demonstrations']
  return {f'{k}shot/picked_shown': float(np.mean([n in d for n, d in zip(names, demos)])),
          f'{k}shot/picked_last_shown': float(np.mean([n == d[-1]
                                                        for n, d in zip(names, demos)]))}


def generation_prompts(split: dict) -> dict[str, np.ndarray]:
  """One prompt per query of a ranking split: its rows' common start, `... <image> an emoji
  of` (the tokens before the first weighted target of row q * C), left padded.

  Returns {'image' float32 [n, k + 1, S, S, 3], 'prompt_tokens' int32 [n, P], 'prompt_mask'
  bool [n, P]} (P: the longest prompt).
  """
  candidates = len(split['candidates'][0])
  first_rows = np.arange(len(split['answer_index'])) * candidates
  prompt_lengths = np.argmax(split['loss_weights'][first_rows] > 0, axis=1) + 1
  width = int(prompt_lengths.max())
  tokens = np.zeros((len(first_rows), width), np.int32)
  mask = np.zeros((len(first_rows), width), bool)
  for i, (row, length) in enumerate(zip(first_rows, prompt_lengths)):
    tokens[i, width - length:] = split['tokens'][row, :length]
    mask[i, width - length:] = True
  return {'image': split['image'][first_rows], 'prompt_tokens': tokens, 'prompt_mask': mask}


def written_name(text: str) -> str:
  """The name in a generated caption end ' <name>.': stripped, one final '.' dropped."""
  text = text.strip()
  return text[:-1] if text.endswith('.') else text


class FewShotGenerationEvaluator:
  """`run(params)` -> `{'<k>shot/exact_match', '<k>shot/num_examples', ...}` (see the module
  docstring) for each k of `splits` (as `FewShotEvaluator`'s).

  `answer_fn(params, batch) -> int32 [b, max_new_tokens]` greedy continuations of the
  left-padded prompts of `generation_prompts` (batch: image, prompt_tokens, prompt_mask).
  `write_report` writes the last run's first queries (answer, demonstrations, written name)
  to `<name>_report_<step>.json`.
  """

  def __init__(self, *, answer_fn, tokenizer, splits, batch_size, mesh,
               name: str = 'fewshot_generated'):
    if not splits:
      raise ValueError('no shot counts to evaluate')
    self.name = name
    self.splits = splits
    self.tokenizer = tokenizer
    self._answer = BatchedApply(answer_fn, mesh, batch_size)
    self._last = {}

  def names(self, params, split: dict) -> list[str]:
    """The name written for each query of `split`."""
    return [written_name(self.tokenizer.decode(ids))
            for ids in self._answer(params, generation_prompts(split))]

  def run(self, params) -> dict[str, float]:
    metrics = {}
    splits = self.splits(params) if callable(self.splits) else self.splits
    for k, split in splits.items():
      names = self.names(params, split)
      self._last[k] = [{'answer': answer, 'written': name, 'demonstrations': list(demos)}
                       for answer, name, demos in zip(split['answer'], names,
                                                      split['demonstrations'])]
      right = np.array([name == answer.lower() for name, answer in zip(names, split['answer'])])
      metrics[f'{k}shot/exact_match'] = float(np.mean(right))
      metrics[f'{k}shot/num_examples'] = len(right)
      if not k:
        continue
      metrics.update(_by_answer_shown(k, 'exact_match', right, split['answer_shown']))
      metrics[f'{k}shot/named_shown'] = float(np.mean([
          written in {d.lower() for d in demos}
          for written, demos in zip(names, split['demonstrations'])]))
    return metrics

  def write_report(self, directory: str, step: int, num_examples: int = 100) -> list[str]:
    return reports.write_json(
        directory, self.name, step,
        {f'{k}shot': examples[:num_examples] for k, examples in self._last.items()})


def fewshot_from_config(capabilities, data, mesh, *, name, num_queries, num_candidates,
                        batch_size, shots=(0, 1, 4), demonstrations='candidates', names='seen',
                        seed=0, curriculum='', mode='rank'):
  """Few-shot naming of held-out-style emoji (the emoji data in `EvalData.data_dir`, images at
  its size, rows in its tokenizer's ids).

  demonstrations: 'candidates' or 'other_names' (`interleaved.load_fewshot`) or 'retrieved'
  (`RetrievedDemonstrations`, needs an `ImageEmbedder`); names: 'seen' or 'unseen' (the
  queries' names, see `mmjax.data.interleaved`); curriculum: the rows' format, '' (plain) or
  a curriculum file and options (`interleaved.load_curriculum`, `fewshot_split`); mode: 'rank'
  (`FewShotEvaluator`, needs a `Scorer`) or 'generate' (`FewShotGenerationEvaluator`, needs
  a `Generator`; the candidates unused).
  """
  evaluator = f'config.evals.{name}'
  if mode not in ('rank', 'generate'):
    raise ValueError(f"{evaluator}.mode={mode!r}: use 'rank' or 'generate'")
  shots = tuple(shots)
  pipeline.build('emoji', data.data_dir)
  options = dict(num_queries=num_queries, num_candidates=num_candidates,
                 image_size=data.image_size, seed=seed, names=names)
  if demonstrations == 'retrieved':
    if curriculum:
      raise ValueError(f"{evaluator}: a curriculum needs demonstrations 'candidates' or "
                       "'other_names'")
    splits = RetrievedDemonstrations(
        queries=interleaved.fewshot_queries(data.data_dir, **options),
        tokenizer=data.tokenizer, shots=shots,
        embed_fn=capabilities.require('image_embedder', evaluator).embed, mesh=mesh,
        batch_size=batch_size)
  else:
    splits = interleaved.load_fewshot(data.data_dir, tokenizer=data.tokenizer, shots=shots,
                                      demonstrations=demonstrations,
                                      curriculum=interleaved.load_curriculum(curriculum),
                                      **options)
  if mode == 'generate':
    return FewShotGenerationEvaluator(
        answer_fn=capabilities.require('generator', evaluator).generate,
        tokenizer=data.tokenizer, splits=splits, batch_size=batch_size, mesh=mesh,
        name=f'fewshot_generated_{names}_{demonstrations}')
  return FewShotEvaluator(score_fn=capabilities.require('scorer', evaluator).score,
                          splits=splits, batch_size=batch_size, mesh=mesh)
