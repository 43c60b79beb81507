r"""VQ image tokenizer (Chameleon's VQGAN): conv encoder -> vector quantizer -> conv decoder.

Variants (`--config configs/vq.py:VARIANT`):
  tiny       digits 8x8 -> 4x4 tokens, 32 codes: tests, seconds.
  small      emoji 32x32 -> 8x8 tokens, 512 codes of dim 16, dead-code restarts: a 2-core
             CPU in about 15 minutes (numbers in docs/vq.md).
  chameleon  Chameleon's published tokenizer shape: 512x512 -> 32x32 = 1,024 tokens
             (16x down-sampling), 8,192 codes of dim 256, channels 128 x (1, 1, 2, 2, 4),
             2 residual blocks per level, attention in the middle only; for accelerators.

  python -m mmjax.train --config configs/vq.py:small --workdir /tmp/vq_small \
      --config.quantizer.l2_normalize=True
"""

import ml_collections

from configs import common


def get_config(variant: str = 'tiny') -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.variant = variant
  config.task = 'vq'

  config.data = dict(
      name='digits',
      data_dir='',  # '' = $MMJAX_DATA_DIR, else ~/.cache/mmjax/datasets
      image_size=8,
      augment=True,  # random crop of 80-100% of the area
      jitter=False,  # no colour jitter or blur: a tokenizer reproduces its input as it is
      worker_count=0,
  )

  # Encoder/decoder shape, named as Hugging Face's ChameleonVQVAEConfig except
  # num_codes (HF num_embeddings) and code_dim (HF embed_dim).
  config.model = dict(
      base_channels=16,
      channel_multiplier=(1, 2),  # one level per entry; 2**(len - 1) down-sampling
      num_res_blocks=1,  # per encoder level; the decoder has one more (taming's VQGAN)
      attn_resolutions=(),  # input resolutions / 2**level at which blocks get attention
      mid_attention=True,  # attention at the lowest resolution (HF attn_type='vanilla')
      latent_channels=16,
      num_codes=32,
      code_dim=8,  # quant_conv projects latent_channels -> code_dim; small = factorised
      norm_groups=8,  # GroupNorm groups (Chameleon: 32)
      remat=False,  # recompute each residual block in the backward pass
  )

  config.quantizer = dict(
      l2_normalize=False,  # ViT-VQGAN: nearest code by cosine, codes on the unit sphere
      beta=0.25,  # commitment weight
      ema=False,  # codebook = EMA of assigned latents (VQ-VAE-2) instead of codebook loss
      decay=0.99,  # of the EMA codebook and of the code-usage statistics
      ema_epsilon=1e-7,  # Laplace smoothing of the EMA usage (usage sums to 1)
      # Restart a code on a random batch latent when its usage EMA falls below this
      # fraction of the uniform share 1/num_codes (0: never; Jukebox-style restarts).
      restart_threshold=0.0,
  )

  config.loss = dict(
      pixel='l1',  # 'l1' or 'l2'; no perceptual loss (nothing to download)
      pixel_weight=1.0,
      codebook_weight=1.0,  # ignored with quantizer.ema (the codebook gets no gradient)
      gan_weight=0.0,  # > 0: hinge patch-GAN term (the discriminator trains alongside)
      gan_start=0,  # steps before the GAN terms switch on
      discriminator=dict(channels=64, num_layers=3, norm_groups=32),
  )

  # wd=0: decay would pull the codebook to the origin.
  config.update(common.training(
      batch_size=32, total_steps=100, lr=1e-3, wd=0.0, warmup_steps=10, end_lr_fraction=0.1,
      b2=0.99, eps=1e-8, eval_every=100, checkpoint_every=100))

  config.evals = dict(reconstruction=dict(type='reconstruction', batch_size=256,
                                          grid_images=16))

  if variant == 'tiny':
    pass
  elif variant == 'small':
    config.data.update(name='emoji', image_size=32)
    config.model.update(base_channels=32, channel_multiplier=(1, 2, 2), num_res_blocks=1,
                        latent_channels=64, num_codes=512, code_dim=16, norm_groups=32)
    config.quantizer.restart_threshold = 0.03
    config.batch_size = 32
    config.total_steps = 1500
    config.schedule.warmup_steps = 100
    config.log_every = 50
    config.eval_every = 750
    config.checkpoint_every = 500
  elif variant == 'chameleon':
    config.data.update(name='emoji', image_size=512, worker_count=8)
    config.model.update(base_channels=128, channel_multiplier=(1, 1, 2, 2, 4),
                        num_res_blocks=2, latent_channels=256, num_codes=8192, code_dim=256,
                        norm_groups=32, remat=True)
    config.quantizer.restart_threshold = 0.03
    config.loss.update(gan_weight=0.1, gan_start=10_000)
    config.batch_size = 64
    config.total_steps = 100_000
    config.compute_dtype = 'bfloat16'
    config.lr = 1e-4
    config.adam.update(b1=0.5, b2=0.9)
    config.schedule.warmup_steps = 1_000
    config.evals.reconstruction.batch_size = 64
    config.log_every = 100
    config.eval_every = 5_000
    config.checkpoint_every = 2_000
  else:
    raise ValueError(f'configs/vq.py: unknown variant {variant!r}; use tiny, small or chameleon')

  config.lock()
  return config
