r"""SigLIP: the CLIP towers of configs/clip.py trained with the pairwise sigmoid loss.

`logits = zimg @ ztxt.T * exp(t) + b`, t initialised to log(10) and b to -10 (big_vision).
Variants as in configs/clip.py: tiny, small, base.
"""

import importlib.util
import math
import os


def _clip_config(variant):
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'clip.py')
  spec = importlib.util.spec_from_file_location('mmjax_configs_clip', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def get_config(variant: str = 'tiny'):
  config = _clip_config(variant)
  config.loss = 'sigmoid'
  config.model.temperature_init = math.log(10.0)
  config.model.bias_init = -10.0
  return config
