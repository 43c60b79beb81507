"""The Flamingo research curricula (experiments/flamingo/curricula.py), through the library's
one hook (`mmjax.data.interleaved.Curriculum`, `config.data.curriculum`): made-up names,
repeats only in the last chunk or in the same drawing, cue digits, and cued few-shot rows."""

import importlib.util
import json
import os

import numpy as np
import pytest

from mmjax import config_lib
from mmjax.data import instruct
from mmjax.data import interleaved
from mmjax.data import pipeline
from mmjax.data.tokenizers import ByteLMTokenizer
from mmjax.tasks import flamingo as flamingo_task

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CURRICULA = os.path.join(REPO, 'experiments', 'flamingo', 'curricula.py')
_spec = importlib.util.spec_from_file_location('curricula', CURRICULA)
curricula = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(curricula)


@pytest.fixture(scope='module')
def data_dir(shared_data_dir):
  path = shared_data_dir
  instruct.build(path, ['emoji_name'])
  return path


def _first_batch(data_dir, global_batch_size=16, repeat_prob=0.0, **options):
  """The first batch of an interleaved train stream of 4-chunk rows with `repeat_prob` and
  the curriculum of `options` (`curricula.Curriculum`'s fields)."""
  return next(interleaved.train_iterator(
      data_dir, tokenizer=ByteLMTokenizer(), images_per_sequence=4, max_len=160,
      image_size=8, global_batch_size=global_batch_size, seed=0, repeat_prob=repeat_prob,
      curriculum=curricula.Curriculum(**options)))


def _train_names(data_dir) -> list[str]:
  """The name of every example of the emoji train split."""
  return [x['name'] for x in pipeline.split_texts('emoji', 'train', data_dir)]


def test_made_up_names_replace_every_name_consistently(data_dir):
  tokenizer = ByteLMTokenizer()
  made_up = curricula.with_made_up_names(['cat', 'dog', 'cat', 'owl'],
                                           np.random.default_rng(0))
  assert made_up[0] == made_up[2] and len(set(made_up)) == 3
  assert not {'cat', 'dog', 'owl'} & set(made_up)

  plain = _first_batch(data_dir, repeat_prob=0.5, made_up_prob=0.0)
  all_made_up = _first_batch(data_dir, repeat_prob=0.5, made_up_prob=1.0)
  train_names = _train_names(data_dir)
  for key in ('example_id', 'image'):  # the same things and drawings, only renamed
    np.testing.assert_array_equal(plain[key], all_made_up[key])
  for plain_row, row, ids in zip(plain['tokens'], all_made_up['tokens'],
                                 all_made_up['example_id']):
    assert plain_row.tolist() == interleaved.sequence(
        tokenizer, [train_names[i] for i in ids], 160)['tokens'].tolist()
    texts = tokenizer.decode([t for t in row if t < 256]).split('an emoji of ')[1:]
    names = [text.rstrip('.') for text in texts]
    assert len(names) == 4 and not set(names) & set(train_names)
    for i in range(4):  # one made-up name per thing
      for j in range(4):
        assert (names[i] == names[j]) == (train_names[ids[i]] == train_names[ids[j]])


def test_only_the_last_chunk_repeats(data_dir):
  names = ['cat', 'dog', 'cat', 'owl', 'dog', 'emu', 'owl']
  by_name = interleaved.examples_by_name(names)
  rng = np.random.default_rng(0)
  repeated = set()
  for _ in range(20):  # the last shows one of the first three things in its other drawing
    indices = curricula.with_repeats([0, 1, 3, 5], rng, names=names, by_name=by_name,
                                     repeat_prob=1.0, last_only=True)
    np.testing.assert_array_equal(indices[:3], [0, 1, 3])
    repeated.add(int(indices[3]))
  assert repeated == {2, 4, 6}

  example_ids = lambda repeat_prob: _first_batch(
      data_dir, global_batch_size=64, repeat_prob=repeat_prob,
      repeat_last_only=True)['example_id']
  train_names = _train_names(data_dir)
  ids = example_ids(0.5)
  np.testing.assert_array_equal(ids[:, :3], example_ids(0.0)[:, :3])
  distinct_before_last = [len({train_names[i] for i in row[:3]}) for row in ids]
  last_repeats = [train_names[row[3]] in {train_names[i] for i in row[:3]} for row in ids]
  assert np.mean(distinct_before_last) > 2.9  # the stream's own, not repeats
  assert 0.3 < np.mean(last_repeats) < 0.7, np.mean(last_repeats)


def test_repeats_in_the_same_drawing(data_dir):
  names = ['cat', 'dog', 'cat', 'owl', 'dog', 'emu', 'owl']
  by_name = interleaved.examples_by_name(names)
  rng = np.random.default_rng(0)
  last = lambda p: int(curricula.with_repeats(
      [0, 1, 3, 5], rng, names=names, by_name=by_name, repeat_prob=1.0, last_only=True,
      same_drawing_prob=p)[3])
  assert {last(1.0) for _ in range(20)} == {0, 1, 3}  # the earlier chunk's own drawing
  mixed = [last(0.5) for _ in range(400)]
  assert set(mixed) == {0, 1, 3, 2, 4, 6}
  assert 0.4 < np.mean([i in (0, 1, 3) for i in mixed]) < 0.6

  train_names = _train_names(data_dir)
  ids = _first_batch(data_dir, global_batch_size=64, repeat_prob=1.0, repeat_last_only=True,
                     same_drawing_prob=1.0)['example_id']
  assert all(row[3] in row[:3] for row in ids)
  with pytest.raises(ValueError, match='same_drawing_prob'):
    _first_batch(data_dir, same_drawing_prob=1.5)


def test_cues_say_which_chunks_show_one_thing(data_dir):
  cues = curricula.with_cues(['cat', 'dog', 'cat', 'owl'], np.random.default_rng(0))
  assert cues[0] == cues[2] and len(set(cues)) == 3 and all(c.isdigit() for c in cues)

  tokenizer = ByteLMTokenizer()
  row = curricula.sequence(tokenizer, ['cat', 'dog'], max_len=48, cues=['3', '5'])
  text = lambda s: list(tokenizer.encode_text(s))
  image, eoc = tokenizer.image_id, interleaved.EOC_ID
  ids = ([257, image] + text('3 an emoji of cat.') + [eoc, image] + text('5 an emoji of dog.')
         + [eoc])
  np.testing.assert_array_equal(row['tokens'][:len(ids)], ids)
  weighted = row['targets'][row['loss_weights'] == 1]  # the cues and their spaces are not
  np.testing.assert_array_equal(weighted, text('an emoji of cat.') + [eoc]
                                + text('an emoji of dog.') + [eoc])
  # cue_at='name': the cue right before the name, which the cue predicts.
  row = curricula.sequence(tokenizer, ['cat', 'dog'], max_len=48, cues=['3', '5'],
                           cue_at='name')
  ids = ([257, image] + text('an emoji of 3cat.') + [eoc, image] + text('an emoji of 5dog.')
         + [eoc])
  np.testing.assert_array_equal(row['tokens'][:len(ids)], ids)
  np.testing.assert_array_equal(row['targets'][row['loss_weights'] == 1], weighted)
  assert row['loss_weights'][ids.index(text('3')[0])] == 1  # 'c' after the cue is weighted
  with pytest.raises(ValueError, match="cue_at='caption'"):
    curricula.sequence(tokenizer, ['cat'], max_len=48, cues=['3'], cue_at='caption')

  plain = _first_batch(data_dir, repeat_prob=0.5, cue_prob=0.0)
  cued = _first_batch(data_dir, repeat_prob=0.5, cue_prob=1.0)
  train_names = _train_names(data_dir)
  for key in ('example_id', 'image'):  # the same things and drawings, only cued
    np.testing.assert_array_equal(plain[key], cued[key])
  for row, ids in zip(cued['tokens'], cued['example_id']):
    # '3 an emoji of cat.5 an emoji of dog.': each cue stands before ' an emoji of '.
    chunk_cues = [part[-1] for part in
                  tokenizer.decode([t for t in row if t < 256]).split(' an emoji of ')[:4]]
    for i in range(4):  # one cue per thing
      for j in range(4):
        assert (chunk_cues[i] == chunk_cues[j]) == (train_names[ids[i]] == train_names[ids[j]])


def test_per_thing_cues_leave_repeats_to_the_picture(data_dir):
  cues = curricula.thing_cues(['cat', 'dog', 'cat', 'owl', 'dog'])
  assert cues[2] is None and cues[4] is None  # repeats: uncued
  assert cues[:2] + cues[3:4] == curricula.thing_cues(['cat', 'dog', 'owl'])  # per thing
  assert all(c.isdigit() for c in cues[:2] + cues[3:4])

  tokenizer = ByteLMTokenizer()
  train_names = _train_names(data_dir)
  batch = _first_batch(data_dir, global_batch_size=32, repeat_prob=0.5, made_up_prob=1.0,
                       cue_prob=1.0, cue_at='name', cue_digits='per_thing')
  digit_of = {}  # across sequences, a thing (by its real name) keeps its digit
  for row, ids in zip(batch['tokens'], batch['example_id']):
    captions = tokenizer.decode([t for t in row if t < 256]).split('an emoji of ')[1:]
    for j, caption in enumerate(captions):
      thing = train_names[ids[j]]
      if thing in [train_names[i] for i in ids[:j]]:
        assert not caption[0].isdigit(), caption  # a repeat: only its picture says which
      else:
        assert digit_of.setdefault(thing, caption[0]) == caption[0]
  assert len(set(digit_of.values())) > 5
  with pytest.raises(ValueError, match="cue_digits='per_name'"):
    _first_batch(data_dir, cue_prob=1.0, cue_digits='per_name')

  # A table of digits (data.cue_table: things that look alike share one) instead of the hash.
  assert curricula.thing_cues(['cat', 'dog', 'cat'], {'cat': '7', 'dog': '7'}) == [
      '7', '7', None]
  table = {name: str(len(name) % 10) for name in train_names}
  batch = _first_batch(data_dir, repeat_prob=0.5, cue_prob=1.0, cue_at='name',
                       cue_digits='per_thing', thing_digits=table)
  for row, ids in zip(batch['tokens'], batch['example_id']):
    caption = tokenizer.decode([t for t in row if t < 256]).split('an emoji of ')[1]
    assert caption[0] == table[train_names[ids[0]]]
  del table[train_names[0]]
  with pytest.raises(ValueError, match='thing_digits has no digit for 1 train names'):
    _first_batch(data_dir, cue_prob=1.0, cue_digits='per_thing', thing_digits=table)


def test_cue_table_must_hold_digits(tmp_path):
  path = tmp_path / 'cues.json'
  path.write_text(json.dumps({'cat': '3', 'dog': '3'}))
  assert curricula.load_cue_table(str(path)) == {'cat': '3', 'dog': '3'}
  assert curricula.load_cue_table('') is None
  path.write_text(json.dumps({'cat': '3', 'dog': 12}))
  with pytest.raises(ValueError, match="1 values are not one digit, e.g. \\[\\('dog', 12\\)"):
    curricula.load_cue_table(str(path))


def test_cued_fewshot_rows_cue_the_answer(data_dir):
  """Cued (a curriculum with cues), each demonstration carries its name's cue digit and the
  query its answer's: the shown answer's cue when a demonstration shows it, else a digit no
  demonstration has; after `<image>` (cue_at='image') or right before the name
  (cue_at='name')."""
  tokenizer = ByteLMTokenizer()
  options = dict(tokenizer=tokenizer, shots=(2,), num_queries=8, num_candidates=4,
                 image_size=8, names='unseen')
  cued_at = lambda cue_at: curricula.Curriculum(cue_prob=1.0, cue_at=cue_at)
  plain = interleaved.load_fewshot(data_dir, **options)[2]
  cued = interleaved.load_fewshot(data_dir, curriculum=cued_at('image'), **options)[2]
  at_name = interleaved.load_fewshot(data_dir, curriculum=cued_at('name'), **options)[2]
  assert 0 < cued['answer_shown'].sum() < 8
  for key in ('image', 'answer', 'candidates', 'demonstrations', 'answer_shown'):
    np.testing.assert_array_equal(np.asarray(plain[key], object), np.asarray(cued[key], object))
  for q, (answer, demos) in enumerate(zip(cued['answer'], cued['demonstrations'])):
    row = cued['tokens'][q * 4 + cued['answer_index'][q]]
    parts = tokenizer.decode([t for t in row if t < 256]).split(' an emoji of ')
    demo_cues, query_cue = [part[-1] for part in parts[:2]], parts[2][-1]
    assert all(c.isdigit() for c in demo_cues + [query_cue])
    assert (demo_cues[0] == demo_cues[1]) == (demos[0] == demos[1])
    if answer in demos:
      assert query_cue == demo_cues[demos.index(answer)]
    else:
      assert query_cue not in demo_cues
    # The weighted targets are ' <answer>.' as without cues.
    weighted = row[1:][cued['loss_weights'][q * 4 + cued['answer_index'][q]][:-1] == 1]
    assert tokenizer.decode(weighted) == f' {answer.lower()}.'

    # cue_at='name': the same cues, each right before its name; the answer follows the cue.
    row = at_name['tokens'][q * 4 + at_name['answer_index'][q]]
    expected = ''.join(f'an emoji of {cue}{name}.'
                       for cue, name in zip(demo_cues + [query_cue], demos + [answer]))
    assert tokenizer.decode([t for t in row if t < 256]) == expected.lower()
    weighted = row[1:][at_name['loss_weights'][q * 4 + at_name['answer_index'][q]][:-1] == 1]
    assert tokenizer.decode(weighted) == f'{answer.lower()}.'


def test_one_config_key_selects_a_curriculum(data_dir):
  """`config.data.curriculum` = 'FILE.py:KEY=VALUE,...' (a relative FILE from the repository
  root too); the task's stream is the library's with that curriculum; '' is the plain
  format; a bad option fails in `validate_config`, naming the key."""
  spec = ('experiments/flamingo/curricula.py:made_up_prob=0.5,cue_prob=1.0,cue_at=name,'
          'repeat_last_only=True')
  options = dict(made_up_prob=0.5, cue_prob=1.0, cue_at='name', repeat_last_only=True)
  assert vars(interleaved.load_curriculum(spec)) == vars(curricula.Curriculum(**options))
  assert type(interleaved.load_curriculum('')) is interleaved.Curriculum
  with pytest.raises(ValueError, match="no option 'cue'"):
    interleaved.load_curriculum('experiments/flamingo/curricula.py:cue=1')
  with pytest.raises(FileNotFoundError, match='nowhere.py'):
    interleaved.load_curriculum('experiments/flamingo/nowhere.py:')

  flamingo_tiny = os.path.join(REPO, 'configs', 'flamingo.py') + ':tiny'
  config = config_lib.load(flamingo_tiny, {'data.data_dir': data_dir, 'data.curriculum': spec})
  flamingo_task.FlamingoTask.validate_config(config)
  data = config.data
  task = flamingo_task.FlamingoTask(config)
  batch = next(task.train_iterator(process_index=0, process_count=1))
  expected = next(interleaved.train_iterator(
      data_dir, tokenizer=ByteLMTokenizer(), images_per_sequence=data.images_per_sequence,
      max_len=data.max_len, image_size=data.image_size, global_batch_size=config.batch_size,
      seed=config.seed, repeat_prob=data.repeat_prob,
      curriculum=curricula.Curriculum(**options)))
  for key in expected:
    np.testing.assert_array_equal(batch[key], expected[key], err_msg=key)
  bad = config_lib.load(flamingo_tiny, {'data.curriculum': spec + ',cue_at=caption'})
  with pytest.raises(ValueError, match="config.data.curriculum=.*cue_at='caption'"):
    flamingo_task.FlamingoTask.validate_config(bad)
  # The cued few-shot diagnostic of configs/flamingo.py: cues after `<image>`.
  cued = interleaved.load_curriculum(config.evals.fewshot_cued_unseen.curriculum)
  assert (cued.cue_prob, cued.cue_at) == (1.0, 'image')
