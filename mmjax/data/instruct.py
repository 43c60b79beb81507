"""Image question-answer data for LLaVA-style decoders, built from the emoji and Tux Paint data.

Question kinds (`QUESTION_KINDS`), each asked about every image of its dataset:
  emoji_name         'What is this?'                          -> the emoji's name
  emoji_group        'Which group does this emoji belong to?' -> its Unicode group
                     ('smileys & emotion', 9 groups; needs apt unicode-data)
  tuxpaint_caption   'Describe the image.'                    -> the stamp's English sentence
  tuxpaint_category  'Which category is this?'                -> the stamp's category
Train: emoji `train` (the training styles) and Tux Paint `train`; eval: emoji `test_seen` (the
held-out style, names seen in training) and Tux Paint `test`. Tux Paint kinds need its apt
package (`tuxpaint.available()`).

Token ids are `mmjax.data.tokenizers.ByteLMTokenizer`'s (pad 0, UTF-8 bytes 1..256, BOS 257,
EOS 258, text lower-cased, and `<image>` 259, the placeholder a model replaces by an image
feature). A training row of length L, right padded:
  [BOS] [IMAGE]*N 'question: <q> answer: ' <answer> [EOS] [PAD]...
with N = num_image_tokens (0: the text-only baseline). An eval prompt of length P, left padded:
  [PAD]... [BOS] [IMAGE]*N 'question: <q> answer: '
The image's ids are the tokenizer's `image_ids(N)`: with `EarlyFusionTokenizer` (Chameleon)
`[begin-image] [IMAGE]*N [end-image]`.

The train iterator mixes the kinds by weight (grain's deterministic interleave), each kind an
endlessly reshuffled stream of its examples; everything random is a function of (seed, kind,
position in the kind's stream), host p of P gets the p-th contiguous block of each global
batch, and `get_state`/`set_state` restore exactly, as `pipeline.train_iterator`.
"""

import dataclasses
import functools
import os

from absl import logging
import grain
import numpy as np

from mmjax.data import emoji
from mmjax.data import pipeline
from mmjax.data import tuxpaint
from mmjax.data.images import prepare_image
from mmjax.data.pipeline import split_source, split_texts
from mmjax.data.tokenizers.byte import BOS_ID, PAD_ID


@dataclasses.dataclass(frozen=True)
class QuestionKind:
  dataset: str  # 'emoji' or 'tuxpaint'.
  question: str
  answer_key: str  # The example's field holding the answer ('group': from `emoji.name_groups`).
  captioning: bool  # Free text, scored by CIDEr and BLEU besides exact match.


QUESTION_KINDS = {
    'emoji_name': QuestionKind('emoji', 'What is this?', 'name', False),
    'emoji_group': QuestionKind('emoji', 'Which group does this emoji belong to?', 'group',
                                False),
    'tuxpaint_caption': QuestionKind('tuxpaint', 'Describe the image.', 'caption', True),
    'tuxpaint_category': QuestionKind('tuxpaint', 'Which category is this?', 'category', False),
}
DEFAULT_WEIGHTS = {name: 1.0 for name in QUESTION_KINDS}
TRAIN_SPLITS = {'emoji': 'train', 'tuxpaint': 'train'}
EVAL_SPLITS = {'emoji': 'test_seen', 'tuxpaint': 'test'}
_QUESTION_PREFIX, _ANSWER_PREFIX = 'question: ', ' answer: '


def available_kinds() -> list[str]:
  """The question kinds whose data is installed here, in `QUESTION_KINDS` order."""
  missing = set()
  if not tuxpaint.available():
    missing |= {'tuxpaint_caption', 'tuxpaint_category'}
  if not os.path.exists(emoji.EMOJI_TEST):
    missing.add('emoji_group')
  return [name for name in QUESTION_KINDS if name not in missing]


def select_kinds(weights) -> dict[str, float]:
  """{kind: weight} of the kinds with a positive weight whose data is installed here.

  Kinds not installed are dropped with a warning; an unknown kind, a negative weight or
  nothing left raise ValueError.
  """
  unknown = set(weights) - set(QUESTION_KINDS)
  if unknown:
    raise ValueError(f'unknown question kinds {sorted(unknown)}; known: {list(QUESTION_KINDS)}')
  if any(weight < 0 for weight in weights.values()):
    raise ValueError(f'question kind weights must be >= 0, got {dict(weights)}')
  available = available_kinds()
  wanted = [name for name in QUESTION_KINDS if weights.get(name, 0) > 0]
  dropped = [name for name in wanted if name not in available]
  if dropped:
    logging.warning('instruct: question kinds %s dropped: their data is not installed', dropped)
  selected = {name: float(weights[name]) for name in wanted if name in available}
  if not selected:
    raise ValueError(f'no question kind left to use from weights {dict(weights)}; installed '
                     f'here: {available}')
  return selected


def build(data_dir: str, kinds) -> None:
  """Builds the datasets that the question kinds `kinds` read (see `pipeline.build`)."""
  for dataset in sorted({QUESTION_KINDS[name].dataset for name in kinds}):
    pipeline.build(dataset, data_dir)


def prompt_text(question: str) -> str:
  return f'{_QUESTION_PREFIX}{question}{_ANSWER_PREFIX}'


def prompt_ids(tokenizer, question: str, num_image_tokens: int) -> np.ndarray:
  """int32: [BOS] <image> 'question: <q> answer: ', the image as `tokenizer.image_ids(N)`
  (`[IMAGE]*N` for LLaVA, with begin/end-image markers for Chameleon)."""
  return np.concatenate([[BOS_ID], tokenizer.image_ids(num_image_tokens),
                         tokenizer.encode_text(prompt_text(question))]).astype(np.int32)


def training_rows(tokenizer, question: str, answers, *, num_image_tokens: int,
                  max_len: int) -> dict[str, np.ndarray]:
  """Training rows for one question and each of `answers`.

  Returns tokens and targets int32 [n, max_len] (targets: tokens shifted left by one, pad
  last), loss_weights float32 [n, max_len] (1 where the target is an answer token or the EOS
  after it) and question_cut, answer_cut bool [n]. A row that does not fit first loses the
  end of its question; if it still does not fit, the end of its answer and the EOS.
  """
  prefix = np.concatenate([[BOS_ID], tokenizer.image_ids(num_image_tokens)])
  head, tail = tokenizer.encode_text(_QUESTION_PREFIX), tokenizer.encode_text(_ANSWER_PREFIX)
  question_ids = tokenizer.encode_text(question)
  room = max_len - len(prefix) - len(head) - len(tail)  # For the question and the answer.
  if room < 1:
    raise ValueError(f'max_len={max_len} leaves no room for an answer after '
                     f'{num_image_tokens} image tokens and the prompt')
  n = len(answers)
  tokens = np.full((n, max_len), PAD_ID, np.int32)
  loss_weights = np.zeros((n, max_len), np.float32)
  question_cut, answer_cut = np.zeros(n, bool), np.zeros(n, bool)
  for row, answer in enumerate(answers):
    answer_ids = np.append(tokenizer.encode_text(answer), tokenizer.eos_id)
    kept_question = question_ids[:max(0, room - len(answer_ids))]
    kept_answer = answer_ids[:room - len(kept_question)]
    question_cut[row] = len(kept_question) < len(question_ids)
    answer_cut[row] = len(kept_answer) < len(answer_ids)
    ids = np.concatenate([prefix, head, kept_question, tail, kept_answer])
    tokens[row, :len(ids)] = ids
    loss_weights[row, len(ids) - len(kept_answer) - 1:len(ids) - 1] = 1
  targets = np.concatenate([tokens[:, 1:], np.full((n, 1), PAD_ID, np.int32)], axis=1)
  return dict(tokens=tokens, targets=targets, loss_weights=loss_weights,
              question_cut=question_cut, answer_cut=answer_cut)


def prompt_length(tokenizer, kinds, num_image_tokens: int) -> int:
  """The length of the longest eval prompt of `kinds`."""
  return max(len(prompt_ids(tokenizer, QUESTION_KINDS[name].question, num_image_tokens))
             for name in kinds)


def eval_prompt(tokenizer, question: str, *, num_image_tokens: int,
                prompt_len: int) -> tuple[np.ndarray, np.ndarray]:
  """(int32 [P], bool [P]): the prompt left padded to P = prompt_len, and where it is not pad."""
  ids = prompt_ids(tokenizer, question, num_image_tokens)
  if len(ids) > prompt_len:
    raise ValueError(f'prompt_len={prompt_len} is shorter than the {len(ids)}-token prompt '
                     f'for {question!r} with {num_image_tokens} image tokens')
  tokens = np.full(prompt_len, PAD_ID, np.int32)
  tokens[prompt_len - len(ids):] = ids
  return tokens, tokens != PAD_ID


def _answers(kind: QuestionKind, texts) -> tuple[np.ndarray, list[str]]:
  """(int [m] indices of the examples (`texts`) that have an answer, their m answers)."""
  if kind.answer_key == 'group':
    groups = emoji.name_groups()
    answers = [groups.get(x['name']) for x in texts]
  else:
    answers = [x[kind.answer_key] for x in texts]
  indices = np.array([i for i, a in enumerate(answers) if a is not None], np.int64)
  if len(indices) < len(answers):
    logging.warning('instruct: %d of %d %s examples have no %s', len(answers) - len(indices),
                    len(answers), kind.dataset, kind.answer_key)
  if not len(indices):
    raise ValueError(f'no {kind.dataset} example has a {kind.answer_key}')
  return indices, [answers[i] for i in indices]


def _train_example(position, rng, *, source, dataset, indices, rows, kind_id, image_size,
                   augment):
  """Element `position` of one kind's stream, its image randomised by `rng`."""
  index = int(indices[position])
  return {
      'image': prepare_image(source[index]['image'], dataset, image_size, rng if augment else None),
      'tokens': rows['tokens'][position],
      'targets': rows['targets'][position],
      'loss_weights': rows['loss_weights'][position],
      'example_id': np.int32(index),
      'kind': np.int32(kind_id),
  }


def question_stream(data_dir: str, name: str, *, tokenizer, num_image_tokens: int,
                    max_len: int, image_size: int, seed: int, augment: bool = True):
  """The endless `grain.MapDataset` of question kind `name`'s training examples (reshuffled
  every epoch; its randomness a function of (seed, kind, position)). Elements as
  `train_iterator`'s, one example each."""
  kind, kind_id = QUESTION_KINDS[name], list(QUESTION_KINDS).index(name)
  split = TRAIN_SPLITS[kind.dataset]
  source = split_source(kind.dataset, split, data_dir)
  indices, answers = _answers(kind, split_texts(kind.dataset, split, data_dir))
  rows = training_rows(tokenizer, kind.question, answers, num_image_tokens=num_image_tokens,
                       max_len=max_len)
  cut_questions, cut_answers = rows.pop('question_cut').sum(), rows.pop('answer_cut').sum()
  if cut_questions:
    logging.warning('instruct: %s: %d of %d rows longer than max_len=%d; their question was '
                    'cut, and in %d of them the answer too', name, cut_questions, len(answers),
                    max_len, cut_answers)
  shuffle_seed, map_seed = np.random.SeedSequence([seed, kind_id]).generate_state(2)
  example = functools.partial(
      _train_example, source=source, dataset=kind.dataset, indices=indices, rows=rows,
      kind_id=kind_id, image_size=image_size, augment=augment)
  return (grain.MapDataset.range(len(indices)).shuffle(seed=int(shuffle_seed))
          .repeat().random_map(example, seed=int(map_seed)))


def train_iterator(data_dir: str, *, tokenizer, weights, num_image_tokens: int, max_len: int,
                   image_size: int, global_batch_size: int, seed: int, process_index: int = 0,
                   process_count: int = 1, worker_count: int = 0, augment: bool = True):
  """Infinite grain iterator of this host's batches of image-question-answer rows.

  `weights`: {kind: weight} (see `select_kinds`); the datasets must be built (`build`). Each
  element, b = global_batch_size // process_count: image float32 [b, S, S, 3] in [-1, 1]
  (random crop and colour jitter as `pipeline.train_iterator`), tokens and targets int32
  [b, L], loss_weights float32 [b, L] (see `training_rows`), example_id int32 [b] (index in
  the dataset's train split) and kind int32 [b] (index in `QUESTION_KINDS`).
  """
  kinds = select_kinds(weights)
  streams = [question_stream(data_dir, name, tokenizer=tokenizer,
                             num_image_tokens=num_image_tokens, max_len=max_len,
                             image_size=image_size, seed=seed, augment=augment)
             for name in kinds]
  ds = grain.MapDataset.mix(streams, list(kinds.values()))
  return pipeline.host_batches(ds, global_batch_size=global_batch_size,
                               process_index=process_index, process_count=process_count,
                               worker_count=worker_count)


def load_eval(data_dir: str, *, tokenizer, kinds, num_image_tokens: int, image_size: int,
              prompt_len: int | None = None) -> dict[str, dict]:
  """The eval examples of each kind in `kinds` (datasets built, see `build`).

  {kind: {'image': float32 [n, S, S, 3] in [-1, 1], 'prompt_tokens': int32 [n, P],
  'prompt_mask': bool [n, P] (see `eval_prompt`), 'answer': list of n reference strings
  (as in the data: Tux Paint captions keep their case), 'example_id': int32 [n] (index in
  the eval split), 'kind': the kind}}. P = prompt_len, default the longest prompt of `kinds`.
  """
  prompt_len = prompt_len or prompt_length(tokenizer, kinds, num_image_tokens)
  images, splits = {}, {}
  for name in kinds:
    kind = QUESTION_KINDS[name]
    split = EVAL_SPLITS[kind.dataset]
    if kind.dataset not in images:
      source = split_source(kind.dataset, split, data_dir)
      images[kind.dataset] = np.stack([prepare_image(source[i]['image'], kind.dataset, image_size)
                                       for i in range(len(source))])
    indices, answers = _answers(kind, split_texts(kind.dataset, split, data_dir))
    tokens, mask = eval_prompt(tokenizer, kind.question, num_image_tokens=num_image_tokens,
                               prompt_len=prompt_len)
    splits[name] = {
        'image': images[kind.dataset][indices],
        'prompt_tokens': np.tile(tokens, (len(indices), 1)),
        'prompt_mask': np.tile(mask, (len(indices), 1)),
        'answer': answers,
        'example_id': indices.astype(np.int32),
        'kind': name,
    }
  return splits
