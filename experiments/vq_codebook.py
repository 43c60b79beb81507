r"""Ablation: the VQ tokenizer's codebook choices (ViT-VQGAN, Yu et al. 2022; Chameleon's
tokenizer): codebook size, code dimension (a factorised lookup: the encoder's 64 latent
channels projected to `code_dim` before the nearest-code search), l2-normalised codes (cosine
lookup) and EMA codebook updates (VQ-VAE-2) instead of the codebook loss, one change at a time
against `configs/vq.py:small` (emoji 32 px -> 8x8 tokens, 512 codes of dim 16, dead-code
restarts), each trained 250 steps x 32 (`small` trains 1,500: a short run, docs/ablations.md).

  python -m mmjax.experiment experiments/vq_codebook.py --workdir workdirs/vq_codebook

Reconstruction on the held-out drawing style (never seen by the tokenizer): PSNR, SSIM,
the fraction of the codebook used and the perplexity of the code histogram (the effective
number of codes) over both held-out splits.
"""

import ml_collections


def get_config():
  return ml_collections.ConfigDict(dict(
      base='configs/vq.py:small',
      overrides=dict(total_steps=250, eval_every=250, checkpoint_every=125),
      arms=dict(
          base={},
          codes_128=dict(model=dict(num_codes=128)),
          dim_4=dict(model=dict(code_dim=4)),
          l2_codes=dict(quantizer=dict(l2_normalize=True)),
          ema=dict(quantizer=dict(ema=True)),
      ),
      seeds=(0, 1),
      metrics=('reconstruction/heldout_style/seen/psnr',
               'reconstruction/heldout_style/unseen/psnr',
               'reconstruction/heldout_style/seen/ssim',
               'reconstruction/all/codebook_usage', 'reconstruction/all/perplexity'),
  ))
