"""Tests for the image question-answer data: row layout, loss weights, prompts, the iterator.

Needs the Tux Paint stamps and unicode-data (.ci/setup installs them as root); without them
the tests fail, on purpose, rather than skip.
"""

import collections

import numpy as np
import pytest

from mmjax.data import emoji
from mmjax.data import instruct
from mmjax.data import pipeline
from mmjax.data import tuxpaint
from mmjax.data.tokenizers import ByteLMTokenizer
from mmjax.data.tokenizers.byte import BOS_ID, EOT_ID, IMAGE_ID, PAD_ID

TOKENIZER = ByteLMTokenizer()
ALL_KINDS = list(instruct.QUESTION_KINDS)


@pytest.fixture(scope='module')
def data_dir(shared_data_dir):
  assert instruct.available_kinds() == ALL_KINDS, (
      f'needs apt packages {tuxpaint.APT_PACKAGE} and unicode-data (.ci/setup as root)')
  path = shared_data_dir
  instruct.build(path, ALL_KINDS)
  return path


def _iterator(data_dir, **kwargs):
  kwargs = dict(tokenizer=TOKENIZER, weights=instruct.DEFAULT_WEIGHTS, num_image_tokens=4,
                max_len=96, image_size=16, global_batch_size=8, seed=0) | kwargs
  return instruct.train_iterator(data_dir, **kwargs)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _records(data_dir, dataset, split):
  source = pipeline.split_source(dataset, split, data_dir)
  return [source[i] for i in range(len(source))]


def test_tokenizer_ids_and_decoding():
  assert (TOKENIZER.vocab_size, TOKENIZER.image_id, TOKENIZER.eos_id) == (260, 259, EOT_ID)
  ids = TOKENIZER.encode_text('Hi É')
  assert ids.tolist() == [b + 1 for b in 'hi é'.encode()]
  row = [PAD_ID, BOS_ID, IMAGE_ID, *ids, EOT_ID, *TOKENIZER.encode_text('junk')]
  assert TOKENIZER.decode(row) == 'hi é'
  assert TOKENIZER.decode(TOKENIZER.encode(['Two words'], 16)[0]) == 'two words'


@pytest.mark.parametrize('num_image_tokens', [0, 3])
def test_training_rows_layout_and_loss_weights(num_image_tokens):
  answers = ['Grinning Face', 'a', 'smileys & emotion']
  rows = instruct.training_rows(TOKENIZER, 'What is this?', answers,
                                num_image_tokens=num_image_tokens, max_len=64)
  tokens, targets, weights = rows['tokens'], rows['targets'], rows['loss_weights']
  assert tokens.shape == targets.shape == weights.shape == (3, 64)
  assert (tokens.dtype, targets.dtype, weights.dtype) == (np.int32, np.int32, np.float32)
  assert not rows['question_cut'].any() and not rows['answer_cut'].any()
  np.testing.assert_array_equal(targets[:, :-1], tokens[:, 1:])
  assert (targets[:, -1] == PAD_ID).all()
  prompt = instruct.prompt_ids(TOKENIZER, 'What is this?', num_image_tokens)
  for row, answer in enumerate(answers):
    assert tokens[row, 0] == BOS_ID
    assert (tokens[row, 1:1 + num_image_tokens] == IMAGE_ID).all()
    assert (tokens[row, 1 + num_image_tokens:] != IMAGE_ID).all()
    assert TOKENIZER.decode(tokens[row]) == f'question: what is this? answer: {answer.lower()}'
    length = len(prompt) + len(answer.encode()) + 1
    np.testing.assert_array_equal(tokens[row, :len(prompt)], prompt)
    assert tokens[row, length - 1] == EOT_ID and (tokens[row, length:] == PAD_ID).all()
    assert set(np.unique(weights[row])) == {0.0, 1.0}
    # The weighted targets are exactly the answer's ids and the EOS, predicted from the
    # positions from the prompt's last token to the answer's last.
    np.testing.assert_array_equal(np.flatnonzero(weights[row]),
                                  np.arange(len(prompt) - 1, length - 1))
    np.testing.assert_array_equal(targets[row][weights[row] > 0],
                                  [*TOKENIZER.encode_text(answer), EOT_ID])


def test_long_rows_lose_the_question_then_the_answer():
  prompt_len = len(instruct.prompt_ids(TOKENIZER, 'Describe it.', 2))
  fixed = prompt_len - len('describe it.')  # BOS, images, 'question: ', ' answer: '.
  answers = ['x' * 5, 'y' * 10, 'z' * 40]
  rows = instruct.training_rows(TOKENIZER, 'Describe it.', answers, num_image_tokens=2,
                                max_len=fixed + 16)
  np.testing.assert_array_equal(rows['question_cut'], [True, True, True])
  np.testing.assert_array_equal(rows['answer_cut'], [False, False, True])
  decoded = [TOKENIZER.decode(t) for t in rows['tokens']]
  assert decoded[0] == 'question: describe i answer: xxxxx'  # 16 = 10 question + 5 + EOS.
  assert decoded[1] == 'question: descr answer: yyyyyyyyyy'
  assert decoded[2] == 'question:  answer: ' + 'z' * 16  # Answer cut, no EOS.
  assert (rows['tokens'][:2] == EOT_ID).sum() == 2 and EOT_ID not in rows['tokens'][2]
  np.testing.assert_array_equal(rows['loss_weights'].sum(1), [6, 11, 16])
  assert (rows['tokens'][:, -1] != PAD_ID).all()  # Every row fills max_len.
  with pytest.raises(ValueError, match=f'max_len={fixed} '):
    instruct.training_rows(TOKENIZER, 'Q', ['a'], num_image_tokens=2, max_len=fixed)


def test_eval_prompt_is_left_padded():
  tokens, mask = instruct.eval_prompt(TOKENIZER, 'What is this?', num_image_tokens=5,
                                      prompt_len=48)
  prompt = instruct.prompt_ids(TOKENIZER, 'What is this?', 5)
  assert tokens.shape == mask.shape == (48,) and tokens.dtype == np.int32 and mask.dtype == bool
  np.testing.assert_array_equal(tokens[48 - len(prompt):], prompt)
  assert (tokens[:48 - len(prompt)] == PAD_ID).all()
  np.testing.assert_array_equal(mask, np.arange(48) >= 48 - len(prompt))
  with pytest.raises(ValueError, match='prompt_len=20'):
    instruct.eval_prompt(TOKENIZER, 'What is this?', num_image_tokens=5, prompt_len=20)


def test_select_kinds():
  assert instruct.select_kinds({'emoji_group': 2, 'emoji_name': 1, 'tuxpaint_caption': 0}) == {
      'emoji_name': 1.0, 'emoji_group': 2.0}
  with pytest.raises(ValueError, match='emoji_nam'):
    instruct.select_kinds({'emoji_nam': 1})
  with pytest.raises(ValueError, match='>= 0'):
    instruct.select_kinds({'emoji_name': -1})
  with pytest.raises(ValueError, match='no question kind'):
    instruct.select_kinds({'emoji_name': 0})


def test_emoji_groups_cover_every_name():
  groups = emoji.name_groups()
  names = set(emoji.official_names().values())
  assert names <= set(groups)
  assert {groups[n] for n in names} == {
      'smileys & emotion', 'people & body', 'animals & nature', 'food & drink',
      'travel & places', 'activities', 'objects', 'symbols', 'flags'}
  assert groups['grinning face'] == 'smileys & emotion'
  assert groups['flag: Japan'] == 'flags'


def test_train_rows_answer_their_examples(data_dir):
  batches = _take(_iterator(data_dir), 8)
  batch = batches[0]
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
      'image': ((8, 16, 16, 3), np.float32), 'tokens': ((8, 96), np.int32),
      'targets': ((8, 96), np.int32), 'loss_weights': ((8, 96), np.float32),
      'example_id': ((8,), np.int32), 'kind': ((8,), np.int32)}
  records = {d: _records(data_dir, d, 'train') for d in ('emoji', 'tuxpaint')}
  groups = emoji.name_groups()
  kinds = collections.Counter()
  for batch in batches:
    assert -1 <= batch['image'].min() and batch['image'].max() <= 1
    np.testing.assert_array_equal(batch['targets'][:, :-1], batch['tokens'][:, 1:])
    for row in range(8):
      name = ALL_KINDS[batch['kind'][row]]
      kind = instruct.QUESTION_KINDS[name]
      x = records[kind.dataset][batch['example_id'][row]]
      answer = groups[x['name'].decode()] if name == 'emoji_group' else x[kind.answer_key].decode()
      text = TOKENIZER.decode(batch['tokens'][row])
      weighted = batch['targets'][row][batch['loss_weights'][row] > 0]
      full = f'question: {kind.question} answer: {answer}'.lower()
      if 1 + 4 + len(full.encode()) + 1 <= 96:
        assert text == full
        np.testing.assert_array_equal(weighted, [*TOKENIZER.encode_text(answer), EOT_ID])
      else:  # Too long: cut, the question first.
        assert name == 'tuxpaint_caption'
        kept = TOKENIZER.decode(weighted)
        assert answer.lower().startswith(kept) and text.endswith(f' answer: {kept}')
      kinds[name] += 1
  assert kinds == {name: 16 for name in ALL_KINDS}  # Equal weights: equal shares.


def test_kind_weights_and_text_only_rows(data_dir):
  weights = {'emoji_name': 3, 'tuxpaint_category': 1}
  batches = _take(_iterator(data_dir, weights=weights, num_image_tokens=0), 4)
  kinds = collections.Counter(ALL_KINDS[k] for b in batches for k in b['kind'])
  assert kinds == {'emoji_name': 24, 'tuxpaint_category': 8}
  for batch in batches:
    assert not (batch['tokens'] == IMAGE_ID).any()
    assert (batch['tokens'][:, 1:11] == TOKENIZER.encode_text('question: ')).all()


def test_iterator_is_deterministic_and_resumable(data_dir):
  first, again = _take(_iterator(data_dir), 3), _take(_iterator(data_dir), 3)
  other_seed = _take(_iterator(data_dir, seed=1), 3)
  for a, b in zip(first, again):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert any((a['example_id'] != b['example_id']).any() for a, b in zip(first, other_seed))
  it = _iterator(data_dir)
  _take(it, 2)
  state = it.get_state()
  expected = next(it)
  resumed = _iterator(data_dir)
  resumed.set_state(state)
  for key, value in next(resumed).items():
    np.testing.assert_array_equal(value, expected[key])


def test_hosts_get_contiguous_blocks_of_the_global_batch(data_dir):
  one = _take(_iterator(data_dir), 2)
  hosts = [_take(_iterator(data_dir, process_index=p, process_count=2), 2) for p in (0, 1)]
  for step in range(2):
    for key, value in one[step].items():
      np.testing.assert_array_equal(
          np.concatenate([hosts[0][step][key], hosts[1][step][key]]), value)
  with pytest.raises(ValueError, match='process_count=3'):
    _iterator(data_dir, process_count=3)


def test_eval_examples(data_dir):
  splits = instruct.load_eval(data_dir, tokenizer=TOKENIZER, kinds=ALL_KINDS,
                              num_image_tokens=2, image_size=16)
  emoji_test = _records(data_dir, 'emoji', 'test_seen')
  tux_test = _records(data_dir, 'tuxpaint', 'test')
  prompt_len = instruct.prompt_length(TOKENIZER, ALL_KINDS, 2)
  assert prompt_len == len(instruct.prompt_ids(
      TOKENIZER, 'Which group does this emoji belong to?', 2))
  groups = emoji.name_groups()
  expected = {
      'emoji_name': [x['name'].decode() for x in emoji_test],
      'emoji_group': [groups[x['name'].decode()] for x in emoji_test],
      'tuxpaint_caption': [x['caption'].decode() for x in tux_test],
      'tuxpaint_category': [x['category'].decode() for x in tux_test],
  }
  for name, split in splits.items():
    n = len(expected[name])
    assert split['kind'] == name and split['answer'] == expected[name]
    np.testing.assert_array_equal(split['example_id'], np.arange(n))
    assert split['image'].shape == (n, 16, 16, 3) and split['image'].dtype == np.float32
    assert split['prompt_tokens'].shape == split['prompt_mask'].shape == (n, prompt_len)
    tokens, mask = instruct.eval_prompt(
        TOKENIZER, instruct.QUESTION_KINDS[name].question, num_image_tokens=2,
        prompt_len=prompt_len)
    assert (split['prompt_tokens'] == tokens).all() and (split['prompt_mask'] == mask).all()
    assert (split['prompt_tokens'][:, -1] == TOKENIZER.encode_text(' ')[0]).all()
  np.testing.assert_array_equal(splits['emoji_name']['image'], splits['emoji_group']['image'])
  assert len(expected['emoji_name']) == len(emoji_test) > 1000
  assert len(set(expected['tuxpaint_caption'])) == len(tux_test)  # One caption per stamp.
