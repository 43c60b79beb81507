r"""The search for a stronger small CLIP recipe (issue 22 item 1): one change at a time against
`configs/clip.py:small`, one seed each, to find what is worth keeping. The image towers
(conv stem, ResNet at 32 and 64 px) are compared in `experiments/image_tower.py`.

  python -m mmjax.experiment experiments/clip_small_recipe.py --workdir workdirs/clip_small_recipe
"""

import math

import ml_collections


def get_config():
  return ml_collections.ConfigDict(dict(
      base='configs/clip.py:small',
      overrides=dict(evals=dict(retrieval=dict(batch_size=256))),
      arms=dict(
          small={},
          patch4=dict(model=dict(image=dict(patch_size=4))),
          lr3e3=dict(lr=3e-3),
          steps1200=dict(total_steps=1200, eval_every=1200, checkpoint_every=400),
          # round 2
          text_mean_pool=dict(model=dict(text=dict(pool='mean'))),
          image16=dict(data=dict(image_size=16), model=dict(image=dict(patch_size=4))),
          restyle30=dict(data=dict(restyle_prob=0.3)),
          sigmoid=dict(loss='sigmoid', model=dict(bias_init=-10.0,
                                                  temperature_init=math.log(10.0))),
          batch256=dict(batch_size=256, total_steps=250, schedule=dict(warmup_steps=25),
                        eval_every=250, checkpoint_every=125),
      ),
      seeds=(0,),
      metrics=('zeroshot/heldout_style/seen/top1', 'zeroshot/heldout_style/seen/top5',
               'zeroshot/heldout_style/unseen/top5'),
  ))
