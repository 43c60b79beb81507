r"""Does a Flamingo checkpoint pick the right one of four earlier names for a repeat?

Held-out sequences in the training format (a seed the runs never used, no augmentation):
five chunks of made-up names, the first four distinct things, the last a repeat of one of
them in another drawing. The model scores the last chunk's name as each of the four earlier
names (mean log-probability of '<name>.') and picks the best; chance is 0.25. `--cued`
gives every thing a cue digit (`cue_at` as `data.cue_at`), so the text says which chunk the
repeat shows: the test of a text-only LM stage's matching. Without cues only the pictures
say it: the test of the `xattn` stage.

  python experiments/flamingo_name_the_repeat.py --workdir workdirs/flamingo_lm_cuename \
      --cued --cue_at name
  python experiments/flamingo_name_the_repeat.py --workdir workdirs/flamingo_cuename \
      --override model.cross_attn_every=1
"""

import argparse
import ast
import os

import jax
import numpy as np

from mmjax import checkpoint
from mmjax import config_lib
from mmjax import evaluate
from mmjax import sharding
from mmjax import tasks
from mmjax.data import interleaved
from mmjax.evals.batching import BatchedApply

CHUNKS = 5
MAX_LEN = 192


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', required=True, help='a Flamingo run (newest checkpoint)')
  parser.add_argument('--config', default='configs/flamingo.py:small')
  parser.add_argument('--override', action='append', default=[],
                      help='KEY=VALUE config overrides the run was trained with (shapes)')
  parser.add_argument('--cued', action='store_true', help='cue digits in the text')
  parser.add_argument('--cue_at', default='image', choices=interleaved.CUE_PLACES)
  parser.add_argument('--num_sequences', type=int, default=256)
  parser.add_argument('--seed', type=int, default=12345)
  return parser.parse_args()


def repeat_rows(task, args):
  """(rows: the four candidate rows of each sequence, answers int [n]: the index of the
  earlier chunk that the last one repeats)."""
  tokenizer = task.tokenizer
  stream = interleaved.train_iterator(
      task.data_dir, tokenizer=tokenizer, images_per_sequence=CHUNKS, max_len=MAX_LEN,
      image_size=task.config.data.image_size, global_batch_size=64, seed=args.seed,
      augment=False, repeat_prob=1.0, made_up_prob=1.0, repeat_last_only=True)
  cue_rng = np.random.default_rng(args.seed)
  rows, answers = [], []
  while len(answers) < args.num_sequences:
    batch = next(stream)
    for tokens, images in zip(batch['tokens'], batch['image']):
      starts = np.flatnonzero(tokens == tokenizer.image_id)
      texts = [tokenizer.decode(tokens[s + 1:]) for s in starts]  # each up to its EOC
      names = [text.removeprefix(interleaved.CAPTION_PREFIX + ' ')[:-1] for text in texts]
      earlier = names[:-1]
      if len(set(earlier)) < CHUNKS - 1 or names[-1] not in earlier:
        continue  # a chance repeat among the first four
      answers.append(earlier.index(names[-1]))
      cues = interleaved.with_cues(names, cue_rng) if args.cued else None
      for candidate in earlier:
        row = interleaved.sequence(tokenizer, earlier + [candidate], MAX_LEN, cues,
                                   args.cue_at)
        # Weigh only the last chunk's '<candidate>.', its EOC not.
        weighted = np.flatnonzero(row['loss_weights'])
        last = weighted[-len(tokenizer.encode_text(f'{candidate}.')) - 1:-1]
        row['loss_weights'] = np.zeros_like(row['loss_weights'])
        row['loss_weights'][last] = 1.0
        rows.append(dict(row, image=images))
  return rows[:4 * args.num_sequences], np.array(answers[:args.num_sequences])


def main():
  args = parse_args()
  overrides = {}
  for item in args.override:
    key, value = item.split('=', 1)
    try:
      overrides[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      overrides[key] = value
  config = config_lib.load(args.config, overrides)
  mesh = sharding.make_mesh(config.mesh, jax.devices())
  with sharding.activate(mesh):
    task = tasks.get_task(config)
    reader = checkpoint.CheckpointReader(os.path.join(args.workdir, 'checkpoints'))
    step = reader.resolve_step(None)
    params = reader.params(step, evaluate.abstract_params(task, mesh))
    rows, answers = repeat_rows(task, args)
    batch = {key: np.stack([row[key] for row in rows]) for key in rows[0]}
    scores = BatchedApply(task.score_fn(mesh), mesh, 64)(params, batch).reshape(-1, 4)
  picked = scores.argmax(axis=1)
  print(f'{args.workdir} step {step}, {"cued at " + args.cue_at if args.cued else "pictures only"}: '
        f'right one of 4 {np.mean(picked == answers):.3f} over {len(answers)} sequences; '
        f'picked position 1-4: {np.round(np.bincount(picked, minlength=4) / len(picked), 2)}')


if __name__ == '__main__':
  main()
