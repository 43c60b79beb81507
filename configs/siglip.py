r"""SigLIP: the sizes of configs/clip.py with SigLIP's towers and pairwise sigmoid loss.

`logits = zimg @ ztxt.T * exp(t) + b`, t initialised to log(10) and b to -10 (big_vision).
The towers are SigLIP's (as big_vision and Hugging Face `SiglipModel`): the image tower has
no class token and no pre-norm, a patch bias, and pools with an attention head (MAP) whose
output is the embedding (no projection); the text tower is bidirectional, pooled at the last
position, then a linear head with bias. Variants as in configs/clip.py: tiny, small, base
(ViT-B/16 with a 768-wide text tower, as SigLIP B/16).

  python -m mmjax.train --config configs/siglip.py:small --workdir /tmp/siglip_small
"""

import math

from configs import clip


def get_config(variant: str = 'tiny'):
  config = clip.get_config(variant)
  config.loss = 'sigmoid'
  config.model.temperature_init = math.log(10.0)
  config.model.bias_init = -10.0
  config.model.image.update(patch_bias=True, class_token=False, ln_pre=False, pool='map')
  config.model.text.update(causal=False, pool='last')
  config.model.image_projection = 'none'
  config.model.text_projection = 'linear_bias'
  # 'none' needs the image width to be the embedding width.
  config.model.embed_dim = config.model.image.width
  if variant == 'base':
    config.model.text.update(width=768, num_heads=12)
  return config
