"""Tests for the answer evaluators: normalisation, CIDEr / BLEU-4, runs with fake models."""

import json

import jax
import jax.numpy as jnp
import numpy as np
from pycocoevalcap.cider.cider import Cider
import pytest
import sacrebleu

from mmjax import sharding
from mmjax.data import instruct
from mmjax.data.tokenizers import ByteLMTokenizer
from mmjax.data.tokenizers.byte import EOT_ID
from mmjax.evals import capabilities
from mmjax.evals import captioning

TOKENIZER = ByteLMTokenizer()
REFERENCES = ['A great blue heron.', 'The baby of a gnu.', 'A red fire truck with a ladder.',
              'Two slices of cheese pizza.', 'A big yellow school bus.',
              'An old steam train on a bridge.']
# The same, tokenised by hand as `caption_words` should: lower case, alphanumeric runs.
REFERENCE_WORDS = ['a great blue heron', 'the baby of a gnu', 'a red fire truck with a ladder',
                   'two slices of cheese pizza', 'a big yellow school bus',
                   'an old steam train on a bridge']


def _mesh(devices=None):
  return sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1), devices)


def test_normalize_answer():
  assert captioning.normalize_answer('  Smileys & Emotion. ') == 'smileys emotion'
  assert captioning.normalize_answer('flag:  United\tStates!') == 'flag united states'
  assert captioning.normalize_answer('Woman’s Hat') == captioning.normalize_answer('womans hat')
  assert captioning.normalize_answer('T-Shirt') == captioning.normalize_answer('tshirt')
  assert captioning.normalize_answer('A banana.') != captioning.normalize_answer('a bananas')


def test_caption_words():
  assert [captioning.caption_words(r) for r in REFERENCES] == REFERENCE_WORDS
  assert captioning.caption_words("A bird's-eye view, 2 CATS!") == 'a bird s eye view 2 cats'


def test_cider_matches_pycocoevalcap():
  predictions = ['A blue heron!', 'a baby gnu', 'A fire truck.', 'cheese pizza slices',
                 'a yellow bus', 'A train.']
  score, scores = captioning.cider(predictions, [[r] for r in REFERENCES])
  words = ['a blue heron', 'a baby gnu', 'a fire truck', 'cheese pizza slices', 'a yellow bus',
           'a train']
  expected, expected_scores = Cider().compute_score(
      {i: [r] for i, r in enumerate(REFERENCE_WORDS)}, {i: [p] for i, p in enumerate(words)})
  assert score == pytest.approx(expected, rel=1e-12)
  np.testing.assert_allclose(scores, expected_scores, rtol=1e-12)
  perfect, perfect_scores = captioning.cider(REFERENCES, [[r] for r in REFERENCES])
  np.testing.assert_allclose(perfect_scores, 10.0)  # The maximum: every n-gram order matches.
  shuffled, _ = captioning.cider(np.roll(REFERENCES, 1), [[r] for r in REFERENCES])
  assert shuffled < score < perfect


def test_bleu4_matches_sacrebleu():
  predictions = ['A blue heron.', 'The baby of a gnu.', 'A red fire truck.', 'Cheese pizza.',
                 'A big yellow bus.', 'A steam train on a bridge.']
  expected = sacrebleu.corpus_bleu(predictions, [REFERENCES], lowercase=True).score
  score = captioning.bleu4(predictions, [[r] for r in REFERENCES])
  assert score == pytest.approx(expected, rel=1e-12)
  assert captioning.bleu4([r.lower() for r in REFERENCES], [[r] for r in REFERENCES]) == (
      pytest.approx(100))
  assert captioning.bleu4(np.roll(REFERENCES, 1), [[r] for r in REFERENCES]) < score < 100
  # Any reference may match, and examples may have different numbers of references.
  references = [[r] if i % 2 else ['Something else entirely.', r] for i, r in
                enumerate(REFERENCES)]
  assert captioning.bleu4(REFERENCES, references) == pytest.approx(100)


def _synthetic_splits(num_image_tokens=2):
  """Two kinds whose images carry their index in pixel [0, 0, 0] (for the fake models)."""
  answers = {'tuxpaint_caption': REFERENCES * 2 + ['A pickup truck.'],
             'emoji_name': [f'Name {i}: Ice {i}!' for i in range(130)]}
  splits, start = {}, 0
  for kind, kind_answers in answers.items():
    n = len(kind_answers)
    image = np.zeros((n, 4, 4, 3), np.float32)
    image[:, 0, 0, 0] = start + np.arange(n)
    tokens, mask = instruct.eval_prompt(TOKENIZER, instruct.QUESTION_KINDS[kind].question,
                                        num_image_tokens=num_image_tokens, prompt_len=48)
    splits[kind] = {'image': image, 'prompt_tokens': np.tile(tokens, (n, 1)),
                    'prompt_mask': np.tile(mask, (n, 1)), 'answer': kind_answers,
                    'example_id': np.arange(n, dtype=np.int32), 'kind': kind}
    start += n
  return splits


def _answer_table(splits, perfect: bool, n_new: int = 48) -> np.ndarray:
  """int32 [examples, n_new]: per example (in pixel-index order), its reference answer, EOS
  and junk after it (perfect), or random letters and spaces that form no English word."""
  answers = [a for split in splits.values() for a in split['answer']]
  if not perfect:
    return np.random.default_rng(0).choice(TOKENIZER.encode_text('qzxj '), (len(answers), n_new))
  table = np.tile(np.resize(TOKENIZER.encode_text('junk after the end '), n_new),
                  (len(answers), 1))
  for row, answer in enumerate(answers):
    ids = [*TOKENIZER.encode_text(answer), EOT_ID]
    table[row, :len(ids)] = ids
  return table


def _fake_answer_fn(seen_batches):
  """answer_fn(table, batch): the table's row for the index in each image's first pixel."""
  def answer_fn(table, batch):
    seen_batches.append({k: (v.shape, v.dtype) for k, v in batch.items()})
    return table[batch['image'][:, 0, 0, 0].astype(jnp.int32)]
  return answer_fn


def test_evaluator_scores_perfect_and_garbage_answers(tmp_path):
  splits, seen = _synthetic_splits(), []
  evaluator = captioning.AnswerEvaluator(
      answer_fn=_fake_answer_fn(seen), tokenizer=TOKENIZER, splits=splits,
      caption_kinds=['tuxpaint_caption'], batch_size=12, mesh=_mesh())
  metrics = evaluator.run(_answer_table(splits, perfect=True))
  perfect_cider, _ = captioning.cider(splits['tuxpaint_caption']['answer'],
                                      [[a] for a in splits['tuxpaint_caption']['answer']])
  assert metrics == {
      'tuxpaint_caption/exact_match': 1.0, 'tuxpaint_caption/num_examples': 13,
      'tuxpaint_caption/cider': pytest.approx(perfect_cider),
      'tuxpaint_caption/bleu4': pytest.approx(100),
      'emoji_name/exact_match': 1.0, 'emoji_name/num_examples': 130}
  # Batches of 16 (12 rounded up to the 8 data-parallel devices), whatever the split size.
  assert seen[0] == {'image': ((16, 4, 4, 3), jnp.float32),
                     'prompt_tokens': ((16, 48), jnp.int32), 'prompt_mask': ((16, 48), bool)}
  paths = evaluator.write_report(str(tmp_path), step=7)
  assert paths == [str(tmp_path / 'answers_report_7.json')]
  with open(paths[0]) as f:
    report = json.load(f)
  assert len(report['emoji_name']['examples']) == 100  # The first 100 only.
  assert report['emoji_name']['examples'][3] == {
      'example_id': 3, 'prediction': 'name 3: ice 3!', 'reference': 'Name 3: Ice 3!',
      'exact_match': True}
  assert report['tuxpaint_caption']['examples'][0]['cider'] == pytest.approx(10.0)
  assert report['tuxpaint_caption']['metrics'] == {
      k.split('/', 1)[1]: v for k, v in metrics.items() if k.startswith('tuxpaint_caption/')}

  garbage = evaluator.run(_answer_table(splits, perfect=False))
  assert garbage['tuxpaint_caption/exact_match'] == garbage['emoji_name/exact_match'] == 0
  assert garbage['tuxpaint_caption/cider'] == garbage['tuxpaint_caption/bleu4'] == 0


def test_predictions_do_not_depend_on_mesh_or_batch_size():
  splits = _synthetic_splits()
  table = _answer_table(splits, perfect=False)
  predictions = []
  for mesh, batch_size in ((_mesh(), 8), (_mesh(), 40), (_mesh(jax.devices()[:1]), 7)):
    evaluator = captioning.AnswerEvaluator(
        answer_fn=_fake_answer_fn([]), tokenizer=TOKENIZER, splits=splits, caption_kinds=[],
        batch_size=batch_size, mesh=mesh)
    predictions.append([evaluator.predictions(table, s) for s in splits.values()])
  assert predictions[0] == predictions[1] == predictions[2]
  assert len(predictions[0][1]) == 130


def _fake_task(data_dir, seen_batches):
  """What the builders get from a task: a `Generator` answering from a table of references,
  and the eval data format."""
  offered = capabilities.Capabilities(
      generator=capabilities.Generator(_fake_answer_fn(seen_batches)))
  data = capabilities.EvalData(data_dir=data_dir, image_size=16, tokenizer=TOKENIZER,
                               num_image_tokens=3)
  return offered, data


@pytest.fixture(scope='module')
def data_dir(shared_data_dir):
  assert instruct.available_kinds() == list(instruct.QUESTION_KINDS), (
      'needs apt packages tuxpaint-stamps-default and unicode-data (.ci/setup as root)')
  path = shared_data_dir
  instruct.build(path, instruct.QUESTION_KINDS)
  return path


@pytest.mark.slow
def test_builders_from_config_on_the_eval_splits(data_dir):
  seen = []
  offered, data = _fake_task(data_dir, seen)
  captions = captioning.captioning_from_config(offered, data, _mesh(), name='captioning',
                                               batch_size=256)
  qa = captioning.qa_from_config(offered, data, _mesh(), name='qa', batch_size=256)
  assert list(captions.splits) == ['tuxpaint_caption']
  assert list(qa.splits) == ['emoji_name', 'emoji_group', 'tuxpaint_category']
  for evaluator in (captions, qa):
    start = 0
    for split in evaluator.splits.values():  # Index the images for the fake model.
      split['image'][:, 0, 0, 0] = start + np.arange(len(split['answer']))
      start += len(split['answer'])
    metrics = evaluator.run(_answer_table(evaluator.splits, perfect=True, n_new=200))
    assert all(v == 1.0 for k, v in metrics.items() if k.endswith('exact_match'))
  assert metrics['emoji_name/num_examples'] == metrics['emoji_group/num_examples'] > 1000
  assert seen[0]['prompt_tokens'][0][1] == instruct.prompt_length(
      TOKENIZER, ['tuxpaint_caption'], 3)
  assert captions.run(_answer_table(captions.splits, perfect=True, n_new=200))[
      'tuxpaint_caption/bleu4'] == pytest.approx(100)
  with pytest.raises(ValueError, match='emoji_nam'):
    captioning.qa_from_config(offered, data, _mesh(), name='qa', batch_size=8,
                              kinds=['emoji_nam'])
