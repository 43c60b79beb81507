"""The Flamingo task in the training loop: interleaved rows, only the resampler and gated blocks
train (LM and vision bitwise frozen), a sharded loss equal to one device, and the few-shot
ranking evaluator. The research curricula: test_flamingo_curricula.py."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import config_lib
from mmjax import sharding
from mmjax import train
from mmjax.data import instruct
from mmjax.data import interleaved
from mmjax.data import pipeline
from mmjax.data.tokenizers import ByteLMTokenizer
from mmjax.evals import fewshot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAMINGO_TINY = os.path.join(REPO, 'configs', 'flamingo.py') + ':tiny'


@pytest.fixture(scope='module')
def data_dir(shared_data_dir):
  path = shared_data_dir
  instruct.build(path, ['emoji_name'])
  return path


def flamingo_config(data_dir, **overrides):
  return config_lib.load(FLAMINGO_TINY, {'data.data_dir': data_dir, **overrides})


def _first_batch(data_dir, global_batch_size=16, **options):
  """The first batch of an interleaved train stream of 4-chunk rows with `options`."""
  return next(interleaved.train_iterator(
      data_dir, tokenizer=ByteLMTokenizer(), images_per_sequence=4, max_len=160,
      image_size=8, global_batch_size=global_batch_size, seed=0, **options))


def _train_names(data_dir) -> list[str]:
  """The name of every example of the emoji train split."""
  return [x['name'] for x in pipeline.split_texts('emoji', 'train', data_dir)]


def _flat(params):
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(params))}


def _train_on_one_batch(config, steps, mesh_axes=None):
  """(initial params, final params, losses, trainer, mesh, state) after `steps` steps, all on
  the first batch, on one device or on all 8 (`mesh_axes`)."""
  devices = jax.devices() if mesh_axes else jax.devices()[:1]
  mesh = sharding.make_mesh(mesh_axes or dict(data=1), devices)
  with sharding.activate(mesh):
    trainer = train.Trainer(config, mesh)
    state = trainer.init_state(jax.random.PRNGKey(0))
    initial = _flat(state['params'])
    batch = next(trainer.task.train_iterator(process_index=0, process_count=1))
    batch = {k: batch[k] for k in trainer.task.batch_spec(1)}
    losses = []
    for _ in range(steps):
      state, metrics = trainer.train_step(
          state, sharding.global_batch(batch, trainer.batch_sharding))
      losses.append(float(metrics['loss']))
  return initial, _flat(state['params']), losses, trainer, mesh, state


def test_interleaved_rows(data_dir):
  tokenizer = ByteLMTokenizer()
  row = interleaved.sequence(tokenizer, ['cat', 'dog'], max_len=48)
  text = lambda s: list(tokenizer.encode_text(s))
  image, eoc = tokenizer.image_id, interleaved.EOC_ID
  ids = ([257, image] + text('an emoji of cat.') + [eoc, image] + text('an emoji of dog.')
         + [eoc])
  np.testing.assert_array_equal(row['tokens'][:len(ids)], ids)
  assert not row['tokens'][len(ids):].any()
  np.testing.assert_array_equal(row['targets'][:-1], row['tokens'][1:])
  # Weighted: targets that are caption text or the EOC; not <image>, BOS or padding.
  weighted = row['targets'][row['loss_weights'] == 1]
  np.testing.assert_array_equal(weighted, text('an emoji of cat.') + [eoc]
                                + text('an emoji of dog.') + [eoc])

  batch = next(interleaved.train_iterator(
      data_dir, tokenizer=tokenizer, images_per_sequence=3, max_len=128, image_size=8,
      global_batch_size=4, seed=0))
  assert batch['image'].shape == (4, 3, 8, 8, 3) and batch['example_id'].shape == (4, 3)
  assert ((batch['tokens'] == image).sum(axis=1) == 3).all()


def test_repeated_things_in_other_drawings(data_dir):
  names = ['cat', 'dog', 'cat', 'cat', 'dog', 'owl']
  by_name = interleaved.examples_by_name(names)
  rng = np.random.default_rng(0)
  repeat = lambda indices, p: interleaved.with_repeats(indices, rng, names=names,
                                                       by_name=by_name, repeat_prob=p)
  np.testing.assert_array_equal(repeat([0, 1, 5], 0.0), [0, 1, 5])
  # Always repeating: every chunk shows the first chunk's thing, in unused drawings first.
  indices = repeat([0, 1, 5, 4], 1.0)
  assert sorted(indices[:3]) == [0, 2, 3] and names[indices[3]] == 'cat'
  assert names[repeat([5, 1], 1.0)[1]] == 'owl'  # no other drawing: the same again

  batch = _first_batch(data_dir, global_batch_size=64, repeat_prob=0.5)
  train_names = _train_names(data_dir)
  train_by_name = interleaved.examples_by_name(train_names)
  repeats = new_drawings = 0
  for ids in batch['example_id']:
    for j in range(1, 4):
      earlier = [train_names[i] for i in ids[:j]]
      if train_names[ids[j]] in earlier:
        repeats += 1
        all_used = set(train_by_name[train_names[ids[j]]]) <= set(ids[:j])
        new_drawings += ids[j] not in ids[:j] or all_used
  # 192 chunks after a first, each repeated with probability 0.5 (+ rare chance repeats).
  assert 0.4 < repeats / 192 < 0.62, repeats
  assert new_drawings == repeats  # a drawing shows again only when all of them were used


@pytest.fixture(scope='module')
def config(data_dir):
  # Two key/value heads, so that tensor=2 splits them (tiny has one: GQA).
  return flamingo_config(data_dir, lr=1e-2, **{'model.language_model.num_kv_heads': 2,
                                               'schedule.warmup_steps': 1})


@pytest.fixture(scope='module')
def one_device_run(config):
  """`_train_on_one_batch` of `config` for 6 steps on one device (compiled once per module)."""
  return _train_on_one_batch(config, steps=6)


@pytest.mark.slow
def test_only_resampler_and_gated_blocks_train(one_device_run):
  before, after, losses, *_ = one_device_run
  part = lambda name: name.split("'")[1]
  assert {part(name) for name in before} == {
      'vision_tower', 'resampler', 'media_projection', 'lm', 'gated_xattn'}
  trained = {'resampler', 'media_projection', 'gated_xattn'}
  for name, value in before.items():
    if part(name) in trained:
      assert not np.array_equal(value, after[name]), name
    else:
      np.testing.assert_array_equal(value, after[name], err_msg=name)
  assert losses[-1] < losses[0] - 0.05, losses


@pytest.mark.slow
def test_sharded_loss_equals_one_device(config, one_device_run):
  ref_losses = one_device_run[2][:3]
  losses = _train_on_one_batch(config, steps=3, mesh_axes=dict(data=2, fsdp=2, tensor=2))[2]
  assert ref_losses[2] != ref_losses[0]  # the third loss sees an update (lr is 0 at step 0)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_fewshot_evaluator_runs(one_device_run):
  *_, trainer, mesh, state = one_device_run
  evaluator = trainer.task.evaluators(mesh)['fewshot']
  split = evaluator.splits[4]
  assert split['image'].shape[:2] == (8 * 4, 5)  # 8 queries x 4 candidates; 4 demos + query
  for k, split in evaluator.splits.items():
    answers = [names[i] for names, i in zip(split['candidates'], split['answer_index'])]
    assert answers == split['answer']
    # The demonstrations are k distinct candidates; with 4 of 4, the answer is always shown.
    for names, demos in zip(split['candidates'], split['demonstrations']):
      assert len(set(demos)) == len(demos) == k and set(demos) <= set(names)
    np.testing.assert_array_equal(split['answer_shown'],
                                  [a in d for a, d in zip(answers, split['demonstrations'])])
    assert split['answer_shown'].all() == (k == 4)
  format_split = trainer.task.evaluators(mesh)['fewshot_format'].splits[4]
  for answer, demos in zip(format_split['answer'], format_split['demonstrations']):
    assert answer not in demos
  metrics = evaluator.run(state['params'])
  assert {f'{k}shot/{m}' for k in (0, 1, 4)
          for m in ('accuracy', 'num_examples')} <= set(metrics)
  assert '4shot/accuracy_answer_shown' in metrics
  retrieved = trainer.task.evaluators(mesh)['fewshot_retrieved'].run(state['params'])
  assert {'1shot/accuracy', '4shot/accuracy'} <= set(retrieved)
  assert retrieved['1shot/num_examples'] == retrieved['4shot/num_examples'] == 8
  # New names: queries, candidates and demonstrations are all names never trained on.
  data_dir = trainer.task.data_dir
  unseen = set(pipeline.unseen_names('emoji', data_dir))
  unseen_split = trainer.task.evaluators(mesh)['fewshot_unseen'].splits[4]
  assert set(unseen_split['answer']) <= unseen
  for names, demos in zip(unseen_split['candidates'], unseen_split['demonstrations']):
    assert set(names) <= unseen and set(demos) <= set(names)
  for k in (0, 1, 4):
    assert 0 <= metrics[f'{k}shot/accuracy'] <= 1
    assert metrics[f'{k}shot/num_examples'] == 8


def test_fewshot_accuracy_of_hand_built_scores():
  """A scorer that gives the right candidate the top score gets 1; one that always picks
  candidate 0 gets the fraction of queries whose answer is candidate 0 (batch padding and row
  order included: 5 queries x 3 candidates in batches of 4)."""
  answer_index = np.array([2, 0, 1, 1, 0])
  n, c = len(answer_index), 3
  right = np.zeros((n, c), np.int32)
  right[np.arange(n), answer_index] = 1
  split = {'image': np.zeros((n * c, 1, 2, 2, 3), np.float32),
           'tokens': right.reshape(-1, 1), 'targets': np.zeros((n * c, 1), np.int32),
           'loss_weights': np.arange(n * c, dtype=np.float32).reshape(-1, 1),
           'answer_index': answer_index, 'answer_shown': np.array([1, 1, 0, 0, 0], bool)}
  mesh = sharding.make_mesh(dict(data=1), jax.devices()[:1])
  knows = fewshot.FewShotEvaluator(
      score_fn=lambda params, batch: batch['tokens'][:, 0].astype(np.float32),
      splits={1: split}, batch_size=4, mesh=mesh)
  assert knows.run(None) == {'1shot/accuracy': 1.0, '1shot/num_examples': 5,
                             '1shot/answer_shown': pytest.approx(2 / 5),
                             '1shot/accuracy_answer_shown': 1.0,
                             '1shot/accuracy_answer_not_shown': 1.0}
  first = fewshot.FewShotEvaluator(  # scores decrease along the rows: candidate 0 wins
      score_fn=lambda params, batch: -batch['loss_weights'][:, 0], splits={0: split},
      batch_size=4, mesh=mesh)
  assert first.run(None) == {'0shot/accuracy': pytest.approx(2 / 5), '0shot/num_examples': 5}
  first.splits = {1: split}  # queries 0 and 1 shown: answers 2 and 0, one right
  assert first.run(None) == {'1shot/accuracy': pytest.approx(2 / 5), '1shot/num_examples': 5,
                             '1shot/answer_shown': pytest.approx(2 / 5),
                             '1shot/accuracy_answer_shown': 0.5,
                             '1shot/accuracy_answer_not_shown': pytest.approx(1 / 3)}
  np.testing.assert_array_equal(
      fewshot.ranking_correct(np.array([[1, 1, 0], [0, 2, 1]]), [1, 1]), [False, True])


def test_fewshot_counts_which_demonstration_is_named():
  """With k >= 2 the evaluator reports how often the prediction is a shown name, and the last
  shown one: here a scorer that always picks candidate 0, on 4 queries with 2 demonstrations."""
  candidates = [['cat', 'dog', 'owl'], ['ant', 'bee', 'cat'], ['fox', 'elk', 'yak'],
                ['pig', 'cow', 'hen']]
  demonstrations = [['dog', 'cat'], ['ant', 'cat'], ['elk', 'yak'], ['pig', 'cow']]
  n, c = len(candidates), 3
  split = {'image': np.zeros((n * c, 3, 2, 2, 3), np.float32),
           'tokens': np.zeros((n * c, 1), np.int32), 'targets': np.zeros((n * c, 1), np.int32),
           'loss_weights': np.arange(n * c, dtype=np.float32).reshape(-1, 1),
           'answer_index': np.zeros(n, np.int64), 'answer_shown': np.ones(n, bool),
           'candidates': candidates, 'demonstrations': demonstrations}
  mesh = sharding.make_mesh(dict(data=1), jax.devices()[:1])
  first = fewshot.FewShotEvaluator(  # scores decrease along the rows: candidate 0 wins
      score_fn=lambda params, batch: -batch['loss_weights'][:, 0], splits={2: split},
      batch_size=4, mesh=mesh)
  metrics = first.run(None)
  # Picked cat, ant, fox, pig: shown in queries 0, 1 and 3; the last shown only in query 0.
  assert metrics['2shot/picked_shown'] == pytest.approx(3 / 4)
  assert metrics['2shot/picked_last_shown'] == pytest.approx(1 / 4)


@pytest.mark.slow
def test_generation_prompts_are_the_rows_before_the_names(one_device_run):
  """Each query's prompt, left padded, is its rows' common start: followed by ' <answer>.'
  it is the answer's ranking row."""
  *_, trainer, mesh, _ = one_device_run
  tokenizer = trainer.task.tokenizer
  split = trainer.task.evaluators(mesh)['fewshot'].splits[4]
  prompts = fewshot.generation_prompts(split)
  candidates = len(split['candidates'][0])
  assert prompts['prompt_tokens'].shape[0] == len(split['answer']) == 8
  for q, answer in enumerate(split['answer']):
    prompt = prompts['prompt_tokens'][q][prompts['prompt_mask'][q]]
    assert not prompts['prompt_mask'][q][:-len(prompt)].any()  # padding on the left only
    assert tokenizer.decode(prompt[-11:]) == 'an emoji of'
    completed = np.concatenate([prompt, tokenizer.encode_text(f' {answer}.')])
    row = split['tokens'][q * candidates + split['answer_index'][q]]
    np.testing.assert_array_equal(row[:len(completed)], completed)
    np.testing.assert_array_equal(prompts['image'][q], split['image'][q * candidates])


def test_fewshot_generation_scores_the_written_name(tmp_path):
  """A model that always writes ' Cat.': right where the answer is cat, a shown name where a
  demonstration is cat (4 queries x 3 candidates, 2 demonstrations, batches of 3)."""
  tokenizer = ByteLMTokenizer()
  candidates = [['cat', 'dog', 'owl'], ['ant', 'bee', 'cat'], ['fox', 'elk', 'yak'],
                ['pig', 'cow', 'cat']]
  answer_index = np.array([0, 2, 1, 0])
  demonstrations = [['dog', 'cat'], ['ant', 'cat'], ['elk', 'yak'], ['pig', 'cow']]
  n, c = len(candidates), 3
  tokens = np.tile(np.arange(1, 7, dtype=np.int32), (n * c, 1))
  loss_weights = np.zeros((n * c, 6), np.float32)
  loss_weights[:, 3:] = 1  # prompts of 4 tokens
  split = {'image': np.zeros((n * c, 3, 2, 2, 3), np.float32), 'tokens': tokens,
           'loss_weights': loss_weights, 'candidates': candidates,
           'answer_index': answer_index, 'demonstrations': demonstrations,
           'answer': [names[i] for names, i in zip(candidates, answer_index)],
           'answer_shown': np.array([True, True, True, False])}
  written = np.concatenate([tokenizer.encode_text(' Cat.'), [tokenizer.eos_id, 0, 0]])
  mesh = sharding.make_mesh(dict(data=1), jax.devices()[:1])
  evaluator = fewshot.FewShotGenerationEvaluator(
      answer_fn=lambda params, batch: jnp.tile(written, (len(batch['prompt_tokens']), 1)),
      tokenizer=tokenizer, splits={2: split}, batch_size=3, mesh=mesh)
  assert evaluator.run(None) == {
      '2shot/exact_match': pytest.approx(2 / 4), '2shot/num_examples': 4,
      '2shot/answer_shown': pytest.approx(3 / 4),
      '2shot/exact_match_answer_shown': pytest.approx(2 / 3),
      '2shot/exact_match_answer_not_shown': 0.0,
      '2shot/named_shown': pytest.approx(2 / 4)}
  assert fewshot.written_name(' flag: st. helena.') == 'flag: st. helena'
  [path] = evaluator.write_report(str(tmp_path), step=7)
  with open(path) as f:
    report = json.load(f)
  assert os.path.basename(path) == 'fewshot_generated_report_7.json'
  assert report['2shot'][1] == {'answer': 'cat', 'written': 'cat',
                                'demonstrations': ['ant', 'cat']}


@pytest.mark.slow
def test_fewshot_generation_runs_on_the_model(one_device_run):
  *_, trainer, mesh, state = one_device_run
  metrics = trainer.task.evaluators(mesh)['fewshot_generated_unseen'].run(state['params'])
  for k in (0, 1, 4):
    assert metrics[f'{k}shot/num_examples'] == 8
    assert 0 <= metrics[f'{k}shot/exact_match'] <= 1
  assert 0 <= metrics['4shot/named_shown'] <= 1


def test_retrieved_demonstrations_are_the_most_similar_candidate_drawings():
  """RICES: the k drawings of the candidates nearest the query, the nearest last."""
  directions = np.eye(6, dtype=np.float32)  # one unit direction per train example
  images = lambda *vectors: np.stack([np.broadcast_to(v, (2, 2, 6))[..., :6] for v in vectors])
  train = [directions[i] for i in range(6)]
  train_names = ['cat', 'cat', 'dog', 'dog', 'owl', 'emu']
  # Query 0 is nearest to example 2 (a dog), then 0 (a cat), then 4 (an owl); example 5 (emu)
  # is nearer than all but is no candidate.
  query = 0.5 * directions[0] + 0.8 * directions[2] + 0.3 * directions[4] + 0.9 * directions[5]
  queries = interleaved.FewShotQueries(
      images=images(query), answer=['dog'], candidates=[['owl', 'dog', 'cat']],
      answer_index=np.array([1]), example_id=np.array([0], np.int32), support_names=train_names,
      support_image=lambda i: images(train[i])[0])
  embed = lambda params, x: x[:, 0, 0] / jnp.linalg.norm(x[:, 0, 0], axis=-1, keepdims=True)
  retrieved = fewshot.RetrievedDemonstrations(
      queries=queries, tokenizer=ByteLMTokenizer(), shots=(1, 3), embed_fn=embed,
      mesh=sharding.make_mesh(dict(data=1), jax.devices()[:1]), batch_size=4)
  assert [list(d) for d in retrieved.demonstrations(None, 1)] == [[2]]
  assert [list(d) for d in retrieved.demonstrations(None, 3)] == [[4, 0, 2]]
  splits = retrieved(None)
  assert splits[3]['demonstrations'] == [['owl', 'cat', 'dog']] and splits[3]['answer_shown'][0]
  assert splits[3]['image'].shape == (3, 4, 2, 2, 6)  # 3 candidates; 3 demos + the query
  np.testing.assert_array_equal(splits[3]['image'][0, 2], images(train[2])[0])
