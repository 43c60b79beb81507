r"""How much of a Flamingo run's media (the resampled latents the text cross-attends to)
depends on the picture?

Runs the frozen vision tower and the trained resampler (and media projection) of a
checkpoint on every 20th drawing of the emoji train split (no augmentation) and prints the
mean norm of a latent and of its image-dependent part (its deviation from the mean over the
drawings). A ratio near 0 means the cross-attention reads nearly the same media whatever the
picture: it can tell the LM that an image is there, not which.

  python experiments/flamingo/media_by_image.py --workdir workdirs/flamingo_small
  python experiments/flamingo/media_by_image.py --workdir workdirs/flamingo_picturecue \
      --override model.cross_attn_every=1
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
from mmjax.data.images import prepare_image
from mmjax.evals.batching import BatchedApply


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', required=True, help='a Flamingo run (newest checkpoint)')
  parser.add_argument('--config', default='configs/flamingo.py:small')
  parser.add_argument('--override', action='append', default=[],
                      help='KEY=VALUE config overrides the run was trained with (shapes)')
  parser.add_argument('--every', type=int, default=20, help='use every n-th train drawing')
  return parser.parse_args()


def main():
  args = parse_args()
  config = config_lib.load(args.config, config_lib.parse_overrides(args.override))
  mesh = sharding.make_mesh(config.mesh, jax.devices())
  with sharding.activate(mesh):
    task = tasks.get_task(config)
    step, params = evaluate.restore_params(args.workdir, task, mesh)
    source = pipeline.split_source('emoji', interleaved.TRAIN_SPLIT, task.data_dir)
    images = np.stack([prepare_image(source[i]['image'], 'emoji', config.data.image_size)
                       for i in range(0, len(source), args.every)])
    media_fn = lambda params, images: task.model.apply(
        {'params': params}, images[:, None], method=task.model.media)[:, 0]
    media = BatchedApply(media_fn, mesh, 64)(params, images)  # [n, latents, width]
  norm = np.linalg.norm(media, axis=-1).mean()
  image_part = np.linalg.norm(media - media.mean(axis=0), axis=-1).mean()
  print(f'{args.workdir} step {step}: {len(images)} drawings, a latent\'s norm {norm:.2f}, '
        f'its image-dependent part {image_part:.2f} ({image_part / norm:.2f})')


if __name__ == '__main__':
  main()
