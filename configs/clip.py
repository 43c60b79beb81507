r"""CLIP: ViT (or ResNet) image tower + causal text tower trained with the softmax InfoNCE loss.

Variants (`--config configs/clip.py:VARIANT`):
  tiny   digits 8x8, 2+2 layers of width 64: tests, seconds on a laptop.
  small  emoji 32x32, ViT-4/8 width 128 + 2-layer text: real zero-shot learning on a
         2-core CPU in about 10 minutes (numbers in docs/clip.md).
  base   ViT-B/16 at 224 + 12-layer width-512 text (CLIP ViT-B/16): for GPU/TPU.

  python -m mmjax.train --config configs/clip.py:small --workdir /tmp/clip_small \
      --config.lr=3e-4 --config.mesh.fsdp=2
  # CLIP's ResNet image tower (open_clip's ModifiedResNet; docs/clip.md), as CLIP lays it out:
  python -m mmjax.train --config configs/clip.py:small --workdir /tmp/clip_small_rn \
      --config.model.image.kind=resnet --config.model.image_projection=none
"""

import math

import ml_collections
from ml_collections import config_dict

from configs import common


def get_config(variant: str = 'tiny') -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.variant = variant
  config.task = 'clip'

  config.data = dict(
      name='digits',
      data_dir='',  # '' = $MMJAX_DATA_DIR, else ~/.cache/mmjax/datasets
      image_size=8,
      tokenizer='byte',  # 'byte' (no vocabulary file) or 'clip_bpe' (OpenAI CLIP's BPE)
      max_text_len=48,
      augment=True,
      # Share of training images redrawn in another drawing style (outline, flat colours or
      # gray: mmjax/data/images.py) on top of the colour jitter; emoji and Tux Paint only.
      restyle_prob=0.0,
      worker_count=0,
  )

  config.loss = 'softmax'  # 'softmax' (CLIP) or 'sigmoid' (SigLIP)
  # 'gathered': the [B, B] logits under GSPMD (mmjax/losses.py); 'ring': text blocks pass
  # around the batch devices, one [B/n, B/n] block at a time (mmjax/ring_losses.py).
  config.loss_impl = 'gathered'
  config.model = dict(
      # Architecture switches (CLIP's values here; configs/siglip.py sets SigLIP's):
      # image pool 'cls' (class token) | 'map' (attention-pooling head); text pool 'eot'
      # (at argmax id) | 'last' (last position) | 'mean' (tokens up to end-of-text);
      # projections 'linear' | 'linear_bias' | 'none'.
      image=dict(
          kind='vit',  # 'vit' (ViT) | 'resnet' (CLIP's ModifiedResNet, mmjax/models/resnet.py)
          # kind='vit' reads these:
          patch_size=2, width=64, depth=2, num_heads=2, mlp_ratio=4.0, activation='gelu',
          layer_norm_eps=1e-5, patch_bias=False, class_token=True, ln_pre=True, pool='cls',
          stem='patch',  # 'patch' (patchify convolution) | 'conv' (a convolutional stem)
          # kind='resnet' reads these (and needs data.image_size a multiple of 32): blocks per
          # stage, stem width (features 32x as wide), attention-pool heads, 'batch' | 'group'
          # norm, GroupNorm groups, BatchNorm running-statistics momentum. Its pool projects
          # to embed_dim itself: image_projection='none' is CLIP's layout ('linear' adds one).
          resnet_layers=(1, 1, 1, 1), resnet_width=16, resnet_heads=8, resnet_norm='batch',
          resnet_norm_groups=8, resnet_batch_norm_momentum=0.1),
      text=dict(vocab_size=384, context_length=48, width=64, depth=2, num_heads=2,
                mlp_ratio=4.0, activation='gelu', layer_norm_eps=1e-5, causal=True, pool='eot'),
      image_projection='linear',
      text_projection='linear',
      embed_dim=64,
      temperature_init=math.log(1 / 0.07),
      max_logit_scale=100.0,
      bias_init=config_dict.placeholder(float),
      scan=True,
      # nn.scan's `unroll`: True unrolls the layer loop in the compiled program. On XLA:CPU
      # that is ~30% faster per step for these shallow towers (no stacked activations copied
      # in and out of while loops; experiments/bench_clip_step.py); compile time then grows
      # with depth, so deep variants keep False (one compiled layer).
      scan_unroll=True,
      remat='none',  # 'none' | 'full' | 'dots' | 'dots_no_batch' (mmjax.models.layers)
  )

  config.update(common.training(
      batch_size=64, total_steps=300, lr=1e-3, wd=0.1, warmup_steps=30, end_lr_fraction=0.0,
      b2=0.98, eps=1e-6, eval_every=150, checkpoint_every=100))

  # Evaluators by name (mmjax/evals): `type` picks one, the rest are its options.
  config.evals = dict(zeroshot=dict(type='zeroshot', templates='hand', batch_size=256))

  if variant == 'tiny':
    pass
  elif variant == 'small':
    config.data.update(name='emoji', image_size=32, tokenizer='clip_bpe', max_text_len=24)
    config.evals.retrieval = dict(type='retrieval', batch_size=256)
    config.model.image.update(patch_size=8, width=128, depth=4, num_heads=4)
    config.model.text.update(vocab_size=49408, context_length=24, width=128, depth=2,
                             num_heads=2)
    config.model.embed_dim = 128
    config.batch_size = 128
    config.total_steps = 500
    config.wd = 0.5  # ~4,500 training images: more decay held out styles better than 0.1
    config.schedule.warmup_steps = 50
    config.log_every = 25
    config.eval_every = 250
    config.checkpoint_every = 250
  elif variant == 'base':
    config.data.update(name='emoji', image_size=224, tokenizer='clip_bpe', max_text_len=77,
                       worker_count=8)
    config.evals.retrieval = dict(type='retrieval', batch_size=256)
    config.model.image.update(patch_size=16, width=768, depth=12, num_heads=12,
                              resnet_layers=(3, 4, 6, 3), resnet_width=64, resnet_heads=32)  # RN50
    config.model.text.update(vocab_size=49408, context_length=77, width=512, depth=12,
                             num_heads=8)
    config.model.embed_dim = 512
    config.model.remat = 'full'
    config.model.scan_unroll = False
    config.batch_size = 4096
    config.total_steps = 20_000
    config.compute_dtype = 'bfloat16'
    config.lr, config.wd = 5e-4, 0.2
    config.schedule.warmup_steps = 2_000
    config.log_every = 100
    config.eval_every = 2_000
    config.checkpoint_every = 1_000
  else:
    raise ValueError(f'configs/clip.py: unknown variant {variant!r}; use tiny, small or base')

  config.lock()
  return config
