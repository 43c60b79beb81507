r"""The search for a stronger small CLIP recipe (issue 22 item 1): one change at a time against
`configs/clip.py:small`, one seed each, to find what is worth keeping.

  python -m mmjax.experiment experiments/clip_small_recipe.py --workdir workdirs/clip_small_recipe
"""

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
      ),
      seeds=(0,),
      metrics=('zeroshot/heldout_style/seen/top1', 'zeroshot/heldout_style/seen/top5',
               'zeroshot/heldout_style/unseen/top5'),
  ))
