r"""Ablation: SigLIP's sigmoid loss vs CLIP's softmax loss across batch sizes (the SigLIP
paper's figure 2, small), on the CLIP towers of `configs/clip.py:small`.

  python -m mmjax.experiment experiments/siglip_vs_softmax.py --workdir workdirs/siglip_vs_softmax

Only the loss changes between the arms (and what it needs: the sigmoid loss's bias, started at
-10, and its temperature, started at log 10, as SigLIP); the towers, data, steps and
optimizer are the small CLIP recipe's. Every batch size trains the same number of steps.
"""

import math

import ml_collections


def get_config():
  return ml_collections.ConfigDict(dict(
      base='configs/clip.py:small',
      overrides=dict(),
      arms=dict(
          softmax=dict(loss='softmax'),
          sigmoid=dict(loss='sigmoid', model=dict(bias_init=-10.0,
                                                  temperature_init=math.log(10.0))),
      ),
      grid=dict(batch_size=(32, 64, 128, 256)),
      seeds=(0, 1),
      metrics=('zeroshot/heldout_style/seen/top1', 'zeroshot/heldout_style/unseen/top5',
               'retrieval/heldout_style/text_to_image/R@1'),
      plot_x='batch_size',
  ))
