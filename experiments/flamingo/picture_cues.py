r"""A cue digit per thing from its pictures: the `cue_table` of a curriculum (`curricula.py`).

Each emoji train thing (name) gets the digit of its cluster among 10 k-means clusters of the
frozen vision tower's embeddings (`FlamingoTask.image_embedding_fn`, the unit mean patch
feature; one embedding per thing, the mean over its drawings). Things that look alike share
a digit, so a cross-attention block can learn to read a picture's digit off the features and
carry it to things it never saw, which a hash of the name (`curricula.thing_cues` without a
table) does not allow.

  python experiments/flamingo/picture_cues.py --vision_from workdirs/clip_small \
      --out workdirs/picture_cues.json
  python -m mmjax.train --config configs/flamingo.py:small \
      --config.data.curriculum=experiments/flamingo/curricula.py:cue_prob=0.5,cue_at=name,\
cue_digits=per_thing,cue_table=workdirs/picture_cues.json ...

Prints the cluster sizes and how often a drawing's own nearest centre is its thing's digit
(how well a picture says its thing's cue).
"""

import argparse
import json

import jax
import numpy as np

from mmjax import config_lib
from mmjax import sharding
from mmjax import tasks
from mmjax.data import interleaved
from mmjax.data import pipeline
from mmjax.data.images import prepare_image
from mmjax.evals.batching import BatchedApply

NUM_DIGITS = 10


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--vision_from', required=True, help='a CLIP run (its image tower)')
  parser.add_argument('--config', default='configs/flamingo.py:small')
  parser.add_argument('--out', required=True, help='the JSON {name: digit} to write')
  parser.add_argument('--iterations', type=int, default=100)
  parser.add_argument('--seed', type=int, default=0)
  return parser.parse_args()


def kmeans(points, k: int, iterations: int, rng) -> tuple[np.ndarray, np.ndarray]:
  """Spherical k-means of unit `points [n, d]`: (centres [k, d], assignment int [n])."""
  centres = points[rng.choice(len(points), k, replace=False)]
  for _ in range(iterations):
    assignment = np.argmax(points @ centres.T, axis=1)
    for c in range(k):
      members = points[assignment == c]
      if len(members):
        centre = members.sum(axis=0)
        centres[c] = centre / np.linalg.norm(centre)
  return centres, np.argmax(points @ centres.T, axis=1)


def main():
  args = parse_args()
  config = config_lib.load(args.config, {'init.vision_from': args.vision_from})
  mesh = sharding.make_mesh(config.mesh, jax.devices())
  with sharding.activate(mesh):
    task = tasks.get_task(config)
    params = {'vision_tower': task.pretrained_params()['vision_tower']}
    source = pipeline.split_source('emoji', interleaved.TRAIN_SPLIT, task.data_dir)
    images = np.stack([prepare_image(source[i]['image'], 'emoji', config.data.image_size)
                       for i in range(len(source))])
    embeddings = BatchedApply(task.image_embedding, mesh, 256)(params, images)
  names = [x['name'] for x in pipeline.split_texts('emoji', interleaved.TRAIN_SPLIT,
                                                   task.data_dir)]
  by_name = interleaved.examples_by_name(names)
  things = sorted(by_name)
  means = np.stack([embeddings[by_name[name]].mean(axis=0) for name in things])
  means /= np.linalg.norm(means, axis=1, keepdims=True)
  centres, assignment = kmeans(means, NUM_DIGITS, args.iterations,
                               np.random.default_rng(args.seed))
  digit_of = {name: str(d) for name, d in zip(things, assignment)}
  with open(args.out, 'w') as f:
    json.dump(digit_of, f, indent=0, sort_keys=True)
  own = np.argmax(embeddings @ centres.T, axis=1)
  agrees = np.mean([str(d) == digit_of[name] for d, name in zip(own, names)])
  print(f'{len(things)} things -> {args.out}; things per digit '
        f'{np.bincount(assignment, minlength=NUM_DIGITS).tolist()}; a drawing nearest its '
        f"thing's centre {agrees:.2f} (chance about 0.1)")


if __name__ == '__main__':
  main()
