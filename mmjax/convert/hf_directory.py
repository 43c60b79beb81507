"""Read a local Hugging Face `save_pretrained` directory of a CLIPModel or SiglipModel.

    config, params = load_hf_directory('/path/to/siglip', scan=True)
    CLIP(**config).apply({'params': params}, images_nhwc, token_ids)

Reads `config.json` with `transformers.AutoConfig` (for its defaults; files only, never
the hub) and the weights with the safetensors numpy API, from `model.safetensors` or the
shards listed in `model.safetensors.index.json`. Needs `transformers` and `safetensors`.
"""

import json
import os

import ml_dtypes  # noqa: F401  (lets numpy, and so safetensors, read bfloat16)
import numpy as np

from mmjax.convert import hf_clip
from mmjax.convert import hf_siglip

FAMILIES = {'clip': hf_clip, 'siglip': hf_siglip}  # HF `model_type` -> converter


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """`{HF key: array}` (as stored, e.g. float32 or bfloat16) from a `save_pretrained` dir."""
  import safetensors.numpy

  index = os.path.join(path, 'model.safetensors.index.json')
  if os.path.exists(index):
    with open(index) as f:
      files = sorted(set(json.load(f)['weight_map'].values()))
  else:
    files = ['model.safetensors']
  arrays = {}
  for name in files:
    arrays.update(safetensors.numpy.load_file(os.path.join(path, name)))
  return arrays


def load_hf_directory(path: str, *, scan: bool = True) -> tuple[dict, dict]:
  """A `save_pretrained` directory -> (`CLIP(...)` kwargs, float32 numpy params).

  The family comes from `model_type` in `config.json`: 'clip' or 'siglip'.
  """
  import transformers

  hf_config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
  if hf_config.model_type not in FAMILIES:
    raise ValueError(f'{path}: model_type {hf_config.model_type!r} is not one of '
                     f'{sorted(FAMILIES)}')
  family = FAMILIES[hf_config.model_type]
  config = family.config_from_hf(hf_config, scan=scan)
  return config, family.params_from_hf(read_safetensors(path), config)
