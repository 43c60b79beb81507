r"""Ablation: the small CLIP's image tower (issue 22): the ViT's patchify convolution vs a
convolutional stem (Xiao et al. 2021) vs CLIP's ResNet (open_clip's `ModifiedResNet`) at
32 px and at 64 px, on `configs/clip.py:small` otherwise unchanged (text tower, data, 500
steps x 128, optimizer).

  python -m mmjax.experiment experiments/image_tower.py --workdir workdirs/image_tower

Every arm trains the same steps on the same examples, not the same FLOPs: the arms' measured
throughput on 2 cores is in docs/ablations.md next to the table.
"""

import ml_collections


def get_config():
  resnet = dict(kind='resnet')  # the ResNet's attention pool projects to embed_dim itself
  return ml_collections.ConfigDict(dict(
      base='configs/clip.py:small',
      overrides=dict(evals=dict(retrieval=dict(batch_size=256))),
      arms=dict(
          vit_patch={},
          vit_conv_stem=dict(model=dict(image=dict(stem='conv'))),
          resnet_32px=dict(model=dict(image=resnet, image_projection='none')),
          resnet_64px=dict(data=dict(image_size=64),
                           model=dict(image=resnet, image_projection='none')),
      ),
      seeds=(0, 1),
      metrics=('zeroshot/heldout_style/seen/top1', 'zeroshot/heldout_style/seen/top5',
               'zeroshot/heldout_style/unseen/top5',
               'retrieval/heldout_style/text_to_image/R@1'),
  ))
