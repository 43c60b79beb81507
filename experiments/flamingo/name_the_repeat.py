r"""Does a Flamingo checkpoint pick the right one of four earlier names for a repeat?

Held-out sequences in the training format (a seed the runs never used, no augmentation):
five chunks of made-up names, the first four distinct things, the last a repeat of one of
them in another drawing (`--same_drawing`: the very same picture, the easy match that the
curriculum option `same_drawing_prob` adds to training, see `curricula.py`). The model
scores the last chunk's name as each of the four earlier names (mean log-probability of
'<name>.') and picks the best; chance is 0.25. `--cued` gives every thing a cue digit
(`--cue_at` as the option `cue_at`), so the text says which chunk the repeat shows: the test
of a text-only LM stage's matching. Without cues only the pictures say it: the test of the
`xattn` stage. `--cued --cue_digits per_thing` is the format of `cue_digits=per_thing`
(digits from `--cue_table` as the option `cue_table`, else a hash of the name): the four
carry their things' digits, the repeat none, so the cross-attention must supply the
repeat's digit from its picture.

  python experiments/flamingo/name_the_repeat.py --workdir workdirs/flamingo_lm_cuename \
      --cued --cue_at name
  python experiments/flamingo/name_the_repeat.py --workdir workdirs/flamingo_cuename \
      --override model.cross_attn_every=1 [--same_drawing]
"""

import argparse

import jax
import numpy as np

from mmjax import config_lib
from mmjax import evaluate
from mmjax import sharding
from mmjax import tasks
from mmjax.data import interleaved
from mmjax.data import pipeline
from mmjax.evals.batching import BatchedApply

import curricula  # experiments/flamingo/curricula.py, beside this script

CHUNKS = 5
MAX_LEN = 192


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', required=True, help='a Flamingo run (newest checkpoint)')
  parser.add_argument('--config', default='configs/flamingo.py:small')
  parser.add_argument('--override', action='append', default=[],
                      help='KEY=VALUE config overrides the run was trained with (shapes)')
  parser.add_argument('--cued', action='store_true', help='cue digits in the text')
  parser.add_argument('--cue_at', default='image', choices=curricula.CUE_PLACES)
  parser.add_argument('--cue_digits', default='per_sequence',
                      choices=curricula.CUE_DIGITS_KINDS)
  parser.add_argument('--cue_table', default='', help="per_thing digits, as the option cue_table")
  parser.add_argument('--same_drawing', action='store_true',
                      help='the repeat is the same picture (else another drawing)')
  parser.add_argument('--num_sequences', type=int, default=256)
  parser.add_argument('--seed', type=int, default=12345)
  return parser.parse_args()


def repeat_rows(task, args):
  """(rows: the four candidate rows of each sequence, answers int [n]: the index of the
  earlier chunk that the last one repeats, own_cue bool [n]: per-thing cues only, whether
  the answer's digit is its own among the four, not shared)."""
  tokenizer = task.tokenizer
  stream = interleaved.train_iterator(
      task.data_dir, tokenizer=tokenizer, images_per_sequence=CHUNKS, max_len=MAX_LEN,
      image_size=task.config.data.image_size, global_batch_size=64, seed=args.seed,
      augment=False, repeat_prob=1.0, curriculum=curricula.Curriculum(
          made_up_prob=1.0, repeat_last_only=True,
          same_drawing_prob=1.0 if args.same_drawing else 0.0))
  cue_rng = np.random.default_rng(args.seed)
  things = [x['name'] for x in pipeline.split_texts('emoji', interleaved.TRAIN_SPLIT,
                                                    task.data_dir)]
  digit_of = curricula.load_cue_table(args.cue_table)
  rows, answers, own_cue = [], [], []
  while len(answers) < args.num_sequences:
    batch = next(stream)
    for tokens, images, ids in zip(batch['tokens'], batch['image'], batch['example_id']):
      starts = np.flatnonzero(tokens == tokenizer.image_id)
      texts = [tokenizer.decode(tokens[s + 1:]) for s in starts]  # each up to its EOC
      names = [text.removeprefix(interleaved.CAPTION_PREFIX + ' ')[:-1] for text in texts]
      earlier = names[:-1]
      if len(set(earlier)) < CHUNKS - 1 or names[-1] not in earlier:
        continue  # a chance repeat among the first four
      answers.append(earlier.index(names[-1]))
      cues = None
      if args.cued and args.cue_digits == 'per_thing':
        cues = curricula.thing_cues([things[i] for i in ids], digit_of)
        own_cue.append(cues[:-1].count(cues[answers[-1]]) == 1)
      elif args.cued:
        cues = curricula.with_cues(names, cue_rng)
      for candidate in earlier:
        row = curricula.sequence(tokenizer, earlier + [candidate], MAX_LEN, cues,
                                 args.cue_at)
        # Weigh only the last chunk's '<candidate>.', its EOC not.
        weighted = np.flatnonzero(row['loss_weights'])
        last = weighted[-len(tokenizer.encode_text(f'{candidate}.')) - 1:-1]
        row['loss_weights'] = np.zeros_like(row['loss_weights'])
        row['loss_weights'][last] = 1.0
        rows.append(dict(row, image=images))
  n = args.num_sequences
  return rows[:4 * n], np.array(answers[:n]), np.array(own_cue[:n], bool)


def main():
  args = parse_args()
  config = config_lib.load(args.config, config_lib.parse_overrides(args.override))
  mesh = sharding.make_mesh(config.mesh, jax.devices())
  with sharding.activate(mesh):
    task = tasks.get_task(config)
    step, params = evaluate.restore_params(args.workdir, task, mesh)
    rows, answers, own_cue = repeat_rows(task, args)
    batch = {key: np.stack([row[key] for row in rows]) for key in rows[0]}
    scores = BatchedApply(task.score, mesh, 64)(params, batch).reshape(-1, 4)
  picked = scores.argmax(axis=1)
  shown = f'cued ({args.cue_digits}) at {args.cue_at}' if args.cued else 'pictures only'
  drawing = 'the same drawing' if args.same_drawing else 'another drawing'
  print(f'{args.workdir} step {step}, {shown}, repeat in {drawing}: '
        f'right one of 4 {np.mean(picked == answers):.3f} over {len(answers)} sequences; '
        f'picked position 1-4: {np.round(np.bincount(picked, minlength=4) / len(picked), 2)}')
  if own_cue.size:
    right = picked == answers
    print(f'the answer has a digit of its own in {np.mean(own_cue):.2f} of them: right one '
          f'{np.mean(right[own_cue]):.3f} there, {np.mean(right[~own_cue]):.3f} where shared')


if __name__ == '__main__':
  main()
